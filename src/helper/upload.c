/*
 * Uploads to an object store, on a thread of the helper with libcurl.
 *
 * The main thread queues objects (upload_file, upload_marker); the thread
 * runs up to `concurrency` requests at once over a curl multi handle:
 *  - an object no larger than one part is one PUT;
 *  - a larger one is CreateMultipartUpload, its parts (each read from the
 *    file into a buffer of its own, so memory is parts in flight, never a
 *    whole file), then CompleteMultipartUpload;
 *  - every PUT carries its CRC32 (x-amz-checksum-crc32, declared for the
 *    whole multipart upload at its start and listed again at its
 *    completion), which the server checks against what it received;
 *  - requests are signed by libcurl (CURLOPT_AWS_SIGV4).
 * Failures of the network, 5xx and 429 are retried with backoff, up to
 * MAX_ATTEMPTS per request; a vanished multipart upload restarts its
 * object.  A refusal (bad credentials, no such bucket) fails the object at
 * once, and the first one is said in a line naming the server's code.
 *
 * Objects of one key go in queue order: a later version of a file waits
 * for the earlier one, so the store ends with the newest.  A marker waits
 * for every object queued before it.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>
#include <sodium.h>
#include <zlib.h>

#include "clock.h"
#include "helper.h"
#include "proto.h"
#include "upload.h"

#define MAX_ATTEMPTS 12
#define BACKOFF_MAX_NS (10ull * 1000000000ull)
#define RESP_MAX (64 * 1024)
#define READERS 2 /* threads reading parts and computing their CRC32: a disk
		   * read of a part (the helper wrote it with O_DIRECT) takes
		   * longer than sending it */

enum obj_kind { OBJ_FILE, OBJ_MARKER, OBJ_DELETE };
enum obj_state { O_QUEUED, O_RUNNING, O_DONE, O_FAILED };

struct part {
	char *etag;
	char crc[16];       /* base64 of its CRC32, for the completion */
	int state;          /* 0 to do, 1 in flight, 2 done */
};

struct obj {
	enum obj_kind kind;
	enum obj_state state;
	char *key, *path;
	int fd;
	uint64_t seq;       /* op seq (files) or commit id (markers) */
	uint64_t size;
	uint64_t sent;      /* bytes of parts done */
	int multipart;
	char *upload_id;
	int creating, completing;
	struct part *parts;
	unsigned nparts, parts_done;
	int inflight;
	unsigned gen;       /* bumped when the object starts over */
	int conn_lost;      /* a request lost its connection: the server may have
			     * restarted and forgotten the multipart upload */
	int restarts;
	int warned;         /* a failure was said since the last success */
	uint64_t not_before; /* backing off: start no new request before this */
	int err;            /* errno once failed */
	struct obj *next;
};

struct req {
	struct obj *o;
	int type;           /* R_PUT, R_CREATE, R_PART, R_COMPLETE, R_ABORT, R_DELETE */
	unsigned part;      /* 1-based, R_PART */
	char *body;
	size_t len, pos;
	char *resp;
	size_t resp_len;
	char etag[256];
	char crc[16];       /* base64 of the body's CRC32, big-endian (PUT, part) */
	int attempt;
	unsigned gen;       /* the object's when this request was made */
	uint64_t off;       /* PUT, part: where its body starts in the file */
	int read_err;       /* the reader thread's result */
	uint64_t not_before;
	struct curl_slist *hdr;
	CURL *e;
	struct req *next;   /* in the retry list */
};

enum { R_PUT, R_CREATE, R_PART, R_COMPLETE, R_ABORT, R_DELETE };

static struct {
	int on;
	struct s3conf c;
	struct ackpt_shm *shm;
	pthread_mutex_t mu;
	pthread_t thread, reader[READERS];
	pthread_cond_t rcond;
	struct req *readq, *readq_tail; /* bodies to read, for the reader thread */
	struct req *ready;         /* read: to start */
	CURLM *multi;
	int evfd;
	struct obj *head, *tail;   /* in queue order; done ones are removed */
	struct req *retry;         /* waiting for their backoff */
	unsigned active;           /* requests in flight */
	int stop;
	int refused;               /* the store refused us for good (said once) */
	int bucket_ok;             /* a request to the bucket succeeded once */
	uint32_t failed_flags;     /* UPLOAD_F_FAILED since upload_done_upto said 1 */
	struct { uint64_t id; int result; } markers[64];
	unsigned nmarkers;
	char **failed_keys;
	unsigned nfailed;
} U = { .mu = PTHREAD_MUTEX_INITIALIZER, .rcond = PTHREAD_COND_INITIALIZER, .evfd = -1 };

static void say_event(void)
{
	uint64_t one = 1;

	if (write(U.evfd, &one, sizeof(one)) < 0) {
		/* the counter is full: the main thread has a wakeup pending */
	}
}

int upload_on(void) { return U.on > 0; }
int upload_event_fd(void) { return U.on > 0 ? U.evfd : -1; }

void upload_events(void)
{
	uint64_t v;

	if (U.on > 0 && read(U.evfd, &v, sizeof(v)) < 0) {
		/* nothing pending */
	}
}

/* ---- keys ---- */

/* The key of a local path, or NULL when it is under no root. */
static char *key_of(const char *path)
{
	const char *r = U.shm->cfg.upload_roots;
	char *key;

	for (; *r; r += strlen(r) + 1) {
		size_t n = strlen(r);

		if (strncmp(path, r, n) || (path[n] != '/' && !(n == 1 && r[0] == '/')))
			continue;
		path += n + (r[n - 1] != '/');
		if (!*path)
			return NULL;
		if (asprintf(&key, "%s%s%s", U.c.prefix, *U.c.prefix ? "/" : "", path) < 0)
			return NULL;
		return key;
	}
	return NULL;
}

/* S3's URI encoding: unreserved characters as they are, '/' kept in keys. */
static void uri_encode(char *out, size_t cap, const char *s, int keep_slash)
{
	static const char hex[] = "0123456789ABCDEF";
	size_t o = 0;

	for (; *s && o + 4 < cap; s++) {
		unsigned char ch = (unsigned char)*s;

		if ((ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') ||
		    ch == '-' || ch == '_' || ch == '.' || ch == '~' || (keep_slash && ch == '/')) {
			out[o++] = (char)ch;
		} else {
			out[o++] = '%';
			out[o++] = hex[ch >> 4];
			out[o++] = hex[ch & 15];
		}
	}
	out[o] = 0;
}

static char *object_url(const struct obj *o, const char *query)
{
	char *k = malloc(3 * strlen(o->key) + 8), *url = NULL;
	int n;

	if (!k)
		return NULL;
	uri_encode(k, 3 * strlen(o->key) + 8, o->key, 1);
	if (U.c.path_style)
		n = asprintf(&url, "%s/%s/%s%s%s", U.c.endpoint, U.c.bucket, k, query ? "?" : "",
			     query ? query : "");
	else {
		const char *host = strstr(U.c.endpoint, "://");

		n = asprintf(&url, "%.*s%s.%s/%s%s%s", (int)(host - U.c.endpoint + 3), U.c.endpoint,
			     U.c.bucket, host + 3, k, query ? "?" : "", query ? query : "");
	}
	free(k);
	return n < 0 ? NULL : url;
}

/* ---- requests ---- */

static size_t on_body(char *p, size_t sz, size_t n, void *arg)
{
	struct req *r = arg;
	size_t len = sz * n, keep = len;

	if (r->resp_len + keep > RESP_MAX)
		keep = RESP_MAX - r->resp_len;
	if (keep) {
		char *b = realloc(r->resp, r->resp_len + keep + 1);

		if (b) {
			memcpy(b + r->resp_len, p, keep);
			r->resp = b;
			r->resp_len += keep;
			b[r->resp_len] = 0;
		}
	}
	return len;
}

static size_t on_header(char *p, size_t sz, size_t n, void *arg)
{
	struct req *r = arg;
	size_t len = sz * n;

	if (len > 5 && !strncasecmp(p, "ETag:", 5)) {
		size_t i = 5, j = 0;

		while (i < len && (p[i] == ' ' || p[i] == '\t'))
			i++;
		while (i < len && p[i] != '\r' && p[i] != '\n' && j + 1 < sizeof(r->etag))
			r->etag[j++] = p[i++];
		r->etag[j] = 0;
	}
	return len;
}

static size_t on_read(char *p, size_t sz, size_t n, void *arg)
{
	struct req *r = arg;
	size_t len = sz * n;

	if (len > r->len - r->pos)
		len = r->len - r->pos;
	memcpy(p, r->body + r->pos, len);
	r->pos += len;
	return len;
}

static int on_seek(void *arg, curl_off_t off, int origin)
{
	struct req *r = arg;

	if (origin != SEEK_SET || off < 0 || (size_t)off > r->len)
		return CURL_SEEKFUNC_FAIL;
	r->pos = (size_t)off;
	return CURL_SEEKFUNC_OK;
}

static int content_crc(struct req *r)
{
	char h[64];

	snprintf(h, sizeof(h), "x-amz-checksum-crc32: %s", r->crc);
	r->hdr = curl_slist_append(r->hdr, h);
	r->hdr = curl_slist_append(r->hdr, "x-amz-sdk-checksum-algorithm: CRC32");
	return r->hdr ? 0 : -ENOMEM;
}

/* S3's form of a CRC32: its four bytes, big-endian, in base64. */
static void crc_b64(char *out, size_t cap, uLong crc)
{
	unsigned char be[4] = { (unsigned char)(crc >> 24), (unsigned char)(crc >> 16),
				(unsigned char)(crc >> 8), (unsigned char)crc };

	sodium_bin2base64(out, cap, be, sizeof(be), sodium_base64_VARIANT_ORIGINAL);
}

/*
 * Read part (or all) of the object's file into r->body, and its CRC32.  On
 * the reader thread, without the lock: the transfers go on meanwhile, and
 * the main thread asks about uploads on every op it retires.  The object's
 * descriptor stays open while a request of it exists (obj_free closes it).
 */
static int read_body(struct req *r, uint64_t off, size_t len)
{
	size_t got = 0, done = 0;
	uLong crc = crc32(0L, Z_NULL, 0);
	int ret = 0;

	r->body = malloc(len ? len : 1);
	if (!r->body)
		return -ENOMEM;
	/* the next parts: let the kernel read them while we send this one
	 * (a file the helper wrote with O_DIRECT is not in the page cache) */
	if (len)
		posix_fadvise(r->o->fd, (off_t)(off + len), (off_t)(2 * len), POSIX_FADV_WILLNEED);
	while (got < len) {
		ssize_t n = pread(r->o->fd, r->body + got, len - got, (off_t)(off + got));

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			ret = n < 0 ? -errno : -ENODATA; /* ENODATA: the file shrank under us */
			break;
		}
		got += (size_t)n;
	}
	r->len = len;
	while (!ret && done < len) {
		uInt n = len - done > (1u << 30) ? (1u << 30) : (uInt)(len - done);

		crc = crc32(crc, (const Bytef *)r->body + done, n);
		done += n;
	}
	if (!ret)
		crc_b64(r->crc, sizeof(r->crc), crc);
	return ret;
}

static void *reader_main(void *arg)
{
	(void)arg;
	pthread_mutex_lock(&U.mu);
	for (;;) {
		struct req *r;

		while (!U.readq && !U.stop)
			pthread_cond_wait(&U.rcond, &U.mu);
		if (!U.readq)
			break;
		r = U.readq;
		U.readq = r->next;
		if (!U.readq)
			U.readq_tail = NULL;
		r->next = NULL;
		pthread_mutex_unlock(&U.mu);
		r->read_err = read_body(r, r->off, r->len);
		pthread_mutex_lock(&U.mu);
		r->next = U.ready;
		U.ready = r;
		curl_multi_wakeup(U.multi);
	}
	pthread_mutex_unlock(&U.mu);
	return NULL;
}

/* Queue r's body for the reader; it counts as in flight from now on. */
static void read_then_start(struct req *r, uint64_t off, size_t len)
{
	r->off = off;
	r->len = len;
	r->o->inflight++;
	U.active++;
	if (U.readq_tail)
		U.readq_tail->next = r;
	else
		U.readq = r;
	U.readq_tail = r;
	pthread_cond_signal(&U.rcond);
}

static char *complete_xml(const struct obj *o)
{
	size_t cap = 64 + (size_t)o->nparts * 340, n;
	char *x = malloc(cap);
	unsigned i;

	if (!x)
		return NULL;
	n = (size_t)snprintf(x, cap, "<CompleteMultipartUpload>");
	for (i = 0; i < o->nparts; i++)
		n += (size_t)snprintf(x + n, cap - n, "<Part><PartNumber>%u</PartNumber><ETag>%s</ETag>"
				      "<ChecksumCRC32>%s</ChecksumCRC32></Part>",
				      i + 1, o->parts[i].etag ? o->parts[i].etag : "", o->parts[i].crc);
	snprintf(x + n, cap - n, "</CompleteMultipartUpload>");
	return x;
}

static void req_free(struct req *r)
{
	if (r->e)
		curl_easy_cleanup(r->e);
	curl_slist_free_all(r->hdr);
	free(r->body);
	free(r->resp);
	free(r);
}

/* Build the easy handle for r (a fresh one per attempt). */
static int req_prepare(struct req *r)
{
	struct obj *o = r->o;
	char q[1024], id[768], sigv4[256], *url;
	int ret = 0;

	q[0] = 0;
	if (o->upload_id)
		uri_encode(id, sizeof(id), o->upload_id, 0);
	switch (r->type) {
	case R_CREATE:
		snprintf(q, sizeof(q), "uploads=");
		break;
	case R_PART:
		snprintf(q, sizeof(q), "partNumber=%u&uploadId=%s", r->part, id);
		break;
	case R_COMPLETE:
	case R_ABORT:
		snprintf(q, sizeof(q), "uploadId=%s", id);
		break;
	}
	url = object_url(o, q[0] ? q : NULL);
	r->e = curl_easy_init();
	if (!url || !r->e) {
		free(url);
		return -ENOMEM;
	}
	curl_slist_free_all(r->hdr);
	r->hdr = NULL;
	free(r->resp);
	r->resp = NULL;
	r->resp_len = 0;
	r->etag[0] = 0;
	r->pos = 0;
	curl_easy_setopt(r->e, CURLOPT_URL, url);
	free(url);
	snprintf(sigv4, sizeof(sigv4), "aws:amz:%s:s3", U.c.region);
	curl_easy_setopt(r->e, CURLOPT_AWS_SIGV4, sigv4);
	curl_easy_setopt(r->e, CURLOPT_USERNAME, U.c.access_key);
	curl_easy_setopt(r->e, CURLOPT_PASSWORD, U.c.secret_key);
	curl_easy_setopt(r->e, CURLOPT_PRIVATE, r);
	curl_easy_setopt(r->e, CURLOPT_WRITEFUNCTION, on_body);
	curl_easy_setopt(r->e, CURLOPT_WRITEDATA, r);
	curl_easy_setopt(r->e, CURLOPT_HEADERFUNCTION, on_header);
	curl_easy_setopt(r->e, CURLOPT_HEADERDATA, r);
	curl_easy_setopt(r->e, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(r->e, CURLOPT_CONNECTTIMEOUT, 10L);
	/* a stalled transfer, not a slow one, is a timeout */
	curl_easy_setopt(r->e, CURLOPT_LOW_SPEED_LIMIT, 1024L);
	/* a server assembles a big object before it answers Complete */
	curl_easy_setopt(r->e, CURLOPT_LOW_SPEED_TIME, r->type == R_COMPLETE ? 300L : 30L);
	if (!U.c.verify_tls) {
		curl_easy_setopt(r->e, CURLOPT_SSL_VERIFYPEER, 0L);
		curl_easy_setopt(r->e, CURLOPT_SSL_VERIFYHOST, 0L);
	}
	r->hdr = curl_slist_append(r->hdr, "x-amz-content-sha256: UNSIGNED-PAYLOAD");
	if (U.c.session_token && *U.c.session_token) {
		char *h;

		if (asprintf(&h, "x-amz-security-token: %s", U.c.session_token) >= 0) {
			r->hdr = curl_slist_append(r->hdr, h);
			free(h);
		}
	}
	/* no empty headers ("Expect:" to drop one): curl 7.88 signs them as
	 * given but does not send them, and the signature no longer matches */
	switch (r->type) {
	case R_PUT:
	case R_PART:
		ret = content_crc(r);
		curl_easy_setopt(r->e, CURLOPT_UPLOAD, 1L);
		curl_easy_setopt(r->e, CURLOPT_READFUNCTION, on_read);
		curl_easy_setopt(r->e, CURLOPT_READDATA, r);
		curl_easy_setopt(r->e, CURLOPT_SEEKFUNCTION, on_seek);
		curl_easy_setopt(r->e, CURLOPT_SEEKDATA, r);
		curl_easy_setopt(r->e, CURLOPT_INFILESIZE_LARGE, (curl_off_t)r->len);
		break;
	case R_CREATE:
		curl_easy_setopt(r->e, CURLOPT_POST, 1L);
		curl_easy_setopt(r->e, CURLOPT_POSTFIELDSIZE, 0L);
		curl_easy_setopt(r->e, CURLOPT_POSTFIELDS, "");
		r->hdr = curl_slist_append(r->hdr, "Content-Type: application/octet-stream");
		r->hdr = curl_slist_append(r->hdr, "x-amz-checksum-algorithm: CRC32");
		break;
	case R_COMPLETE:
		curl_easy_setopt(r->e, CURLOPT_POST, 1L);
		curl_easy_setopt(r->e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)r->len);
		curl_easy_setopt(r->e, CURLOPT_POSTFIELDS, r->body);
		r->hdr = curl_slist_append(r->hdr, "Content-Type: application/xml");
		break;
	case R_ABORT:
	case R_DELETE:
		curl_easy_setopt(r->e, CURLOPT_CUSTOMREQUEST, "DELETE");
		break;
	}
	curl_easy_setopt(r->e, CURLOPT_HTTPHEADER, r->hdr);
	return ret;
}

static void obj_finish(struct obj *o, int err, const char *why);

static void req_start(struct req *r)
{
	int ret = req_prepare(r);

	if (ret || curl_multi_add_handle(U.multi, r->e) != CURLM_OK) {
		/* cannot even be built: the object fails */
		struct obj *o = r->o;

		req_free(r);
		if (o->state == O_RUNNING)
			obj_finish(o, ret ? -ret : ENOMEM, "building a request");
		return;
	}
	r->o->inflight++;
	U.active++;
}

static struct req *req_new(struct obj *o, int type, unsigned part)
{
	struct req *r = calloc(1, sizeof(*r));

	if (!r)
		return NULL;
	r->o = o;
	r->type = type;
	r->part = part;
	r->gen = o->gen;
	return r;
}

/* ---- objects ---- */

static void obj_free(struct obj *o)
{
	unsigned i;

	if (o->fd >= 0)
		close(o->fd);
	for (i = 0; i < o->nparts; i++)
		free(o->parts[i].etag);
	free(o->parts);
	free(o->upload_id);
	free(o->key);
	free(o->path);
	free(o);
}

static const char *kind_name(const struct obj *o)
{
	return o->kind == OBJ_MARKER ? "marker" : o->kind == OBJ_DELETE ? "removal" : "upload";
}

static void obj_finish(struct obj *o, int err, const char *why)
{
	unsigned i;

	o->err = err;
	o->state = err ? O_FAILED : O_DONE;
	if (err) {
		char **k = realloc(U.failed_keys, (U.nfailed + 1) * sizeof(*k));

		hlog(0, "%s of s3://%s/%s failed for good: %s", kind_name(o), U.c.bucket, o->key,
		     why ? why : strerror(err));
		if (k) {
			U.failed_keys = k;
			k[U.nfailed++] = strdup(o->key);
		}
		if (o->kind != OBJ_DELETE) {
			__atomic_fetch_add(&U.shm->upload_failures, 1, __ATOMIC_RELAXED);
			U.failed_flags |= UPLOAD_F_FAILED;
		}
	} else if (o->kind != OBJ_DELETE) {
		__atomic_fetch_add(&U.shm->uploaded_objects, 1, __ATOMIC_RELAXED);
		hlog(3, "uploaded %s (%llu bytes) to s3://%s/%s", o->path, (unsigned long long)o->size,
		     U.c.bucket, o->key);
	}
	if (o->kind == OBJ_MARKER)
		for (i = 0; i < U.nmarkers; i++)
			if (U.markers[i].id == o->seq)
				U.markers[i].result = err ? -err : 0;
	say_event(); /* (its descriptor closes with it: a read may be under way) */
}

/* Start what the object needs next; returns the requests started. */
static int obj_step(struct obj *o)
{
	struct req *r;
	unsigned i;

	if (o->state == O_QUEUED) {
		struct stat st;

		o->state = O_RUNNING;
		if (U.refused) {
			obj_finish(o, EACCES, "the store refused this job's uploads (see above)");
			return 0;
		}
		if (o->kind == OBJ_DELETE) {
			if ((r = req_new(o, R_DELETE, 0)))
				req_start(r);
			return 1;
		}
		if (fstat(o->fd, &st) < 0) {
			obj_finish(o, errno, NULL);
			return 0;
		}
		o->size = (uint64_t)st.st_size;
		o->multipart = o->size > U.c.part_size;
		if (!o->multipart) {
			r = req_new(o, R_PUT, 0);
			if (!r) {
				obj_finish(o, ENOMEM, NULL);
				return 0;
			}
			read_then_start(r, 0, (size_t)o->size);
			return 1;
		}
		o->nparts = (unsigned)((o->size + U.c.part_size - 1) / U.c.part_size);
		if (o->nparts > 10000) {
			obj_finish(o, EFBIG, "more than 10000 parts: raise ACKPT_UPLOAD_PART_SIZE");
			return 0;
		}
		o->parts = calloc(o->nparts, sizeof(*o->parts));
		if (!o->parts) {
			obj_finish(o, ENOMEM, NULL);
			return 0;
		}
	}
	if (o->state != O_RUNNING || !o->multipart || o->not_before > now_ns())
		return 0;
	if (!o->upload_id) {
		if (o->creating)
			return 0;
		o->creating = 1;
		if ((r = req_new(o, R_CREATE, 0)))
			req_start(r);
		return 1;
	}
	if (o->parts_done == o->nparts) {
		if (o->completing)
			return 0;
		o->completing = 1;
		r = req_new(o, R_COMPLETE, 0);
		if (r && (r->body = complete_xml(o)))
			r->len = strlen(r->body);
		if (!r || !r->body) {
			if (r)
				req_free(r);
			obj_finish(o, ENOMEM, NULL);
			return 0;
		}
		req_start(r);
		return 1;
	}
	for (i = 0; i < o->nparts; i++) {
		uint64_t off = (uint64_t)i * U.c.part_size;
		size_t len;

		if (o->parts[i].state)
			continue;
		len = (size_t)(o->size - off < U.c.part_size ? o->size - off : U.c.part_size);
		r = req_new(o, R_PART, i + 1);
		if (!r)
			return 0;
		o->parts[i].state = 1;
		read_then_start(r, off, len);
		return 1;
	}
	return 0;
}

/* May o start?  Not before every earlier object of its key, nor (a marker)
 * before every earlier object. */
static int obj_may_start(struct obj *o)
{
	struct obj *p;

	for (p = U.head; p && p != o; p = p->next) {
		if (p->state == O_DONE || p->state == O_FAILED)
			continue;
		if (o->kind == OBJ_MARKER || !strcmp(p->key, o->key))
			return 0;
	}
	return 1;
}

static void schedule(void)
{
	uint64_t now = now_ns();
	struct req **rp = &U.retry, *r;
	struct obj *o;

	/* bodies the reader has read: their requests go out now */
	while ((r = U.ready)) {
		U.ready = r->next;
		r->next = NULL;
		o = r->o;
		o->inflight--;
		U.active--;
		if (r->gen != o->gen || o->state != O_RUNNING) {
			req_free(r); /* its object started over, or is over */
		} else if (r->read_err) {
			int e = -r->read_err;

			if (r->type == R_PART)
				o->parts[r->part - 1].state = 0;
			req_free(r);
			obj_finish(o, e, "reading the local file");
		} else {
			req_start(r);
		}
	}
	while ((r = *rp) && U.active < U.c.concurrency) {
		if (r->not_before > now) {
			rp = &r->next;
			continue;
		}
		*rp = r->next;
		r->next = NULL;
		r->o->inflight--;
		if (r->gen != r->o->gen || r->o->state != O_RUNNING)
			req_free(r); /* its object started over, or is over */
		else
			req_start(r);
	}
	for (o = U.head; o && U.active < U.c.concurrency; o = o->next) {
		if (o->state == O_DONE || o->state == O_FAILED)
			continue;
		if (o->state == O_QUEUED && !obj_may_start(o))
			continue;
		while (U.active < U.c.concurrency && obj_step(o))
			;
	}
	/* drop finished objects from the head, keeping queue order */
	while (U.head && (U.head->state == O_DONE || U.head->state == O_FAILED) && !U.head->inflight) {
		o = U.head;
		U.head = o->next;
		if (!U.head)
			U.tail = NULL;
		obj_free(o);
	}
	__atomic_store_n(&U.shm->uploads_pending, 0, __ATOMIC_RELAXED);
	{
		uint64_t n = 0;

		for (o = U.head; o; o = o->next)
			n += o->state == O_QUEUED || o->state == O_RUNNING;
		__atomic_store_n(&U.shm->uploads_pending, n, __ATOMIC_RELAXED);
	}
}

/* The server's <Code> and <Message>, or the HTTP status. */
static void error_text(const struct req *r, long code, char *out, size_t cap)
{
	const char *c = r->resp ? strstr(r->resp, "<Code>") : NULL;
	const char *m = r->resp ? strstr(r->resp, "<Message>") : NULL;
	int cl = 0, ml = 0;

	if (c) {
		c += 6;
		cl = (int)(strcspn(c, "<"));
	}
	if (m) {
		m += 9;
		ml = (int)(strcspn(m, "<"));
	}
	if (c)
		snprintf(out, cap, "%.*s%s%.*s (HTTP %ld)", cl, c, m ? ": " : "", ml, m ? m : "", code);
	else
		snprintf(out, cap, "HTTP %ld", code);
}

static int has_code(const struct req *r, const char *code)
{
	char tag[96];

	snprintf(tag, sizeof(tag), "<Code>%s</Code>", code);
	return r->resp && strstr(r->resp, tag);
}

static void retry_later(struct req *r)
{
	uint64_t back = 200000000ull << (r->attempt < 6 ? r->attempt : 6);

	if (back > BACKOFF_MAX_NS)
		back = BACKOFF_MAX_NS;
	back += (uint64_t)(rand() % 1000) * (back / 4000); /* up to a quarter more */
	r->not_before = now_ns() + back;
	r->o->inflight++; /* the object stays while a retry of it waits */
	r->next = U.retry;
	U.retry = r;
}

/* A multipart upload the server no longer knows: start the object over. */
static void obj_restart(struct obj *o)
{
	unsigned i;

	hlog(1, "s3://%s/%s: the server lost the multipart upload; starting the object again",
	     U.c.bucket, o->key);
	o->gen++;
	o->restarts++;
	o->conn_lost = 0;
	free(o->upload_id);
	o->upload_id = NULL;
	o->creating = o->completing = 0;
	o->parts_done = 0;
	o->sent = 0;
	for (i = 0; i < o->nparts; i++) {
		free(o->parts[i].etag);
		o->parts[i].etag = NULL;
		o->parts[i].state = 0;
	}
}

static void req_done(struct req *r, CURLcode res)
{
	struct obj *o = r->o;
	long code = 0;
	char why[512];
	int transient, refused = 0;

	curl_easy_getinfo(r->e, CURLINFO_RESPONSE_CODE, &code);
	curl_multi_remove_handle(U.multi, r->e);
	curl_easy_cleanup(r->e);
	r->e = NULL;
	o->inflight--;
	U.active--;
	if (r->gen != o->gen || o->state != O_RUNNING) {
		/* of an attempt the object has started over from, or gave up */
		req_free(r);
		return;
	}

	if (res == CURLE_OK && code / 100 == 2 && !(r->type == R_COMPLETE && r->resp &&
						    strstr(r->resp, "<Error>"))) {
		U.bucket_ok = 1;
		if (o->warned)
			hlog(1, "s3://%s/%s: the server answers again", U.c.bucket, o->key);
		o->warned = 0;
		switch (r->type) {
		case R_PUT:
			__atomic_fetch_add(&U.shm->uploaded_bytes, r->len, __ATOMIC_RELAXED);
			obj_finish(o, 0, NULL);
			break;
		case R_CREATE: {
			const char *p = r->resp ? strstr(r->resp, "<UploadId>") : NULL;

			o->creating = 0;
			if (!p) {
				obj_finish(o, EPROTO, "no UploadId in the server's answer");
				break;
			}
			p += 10;
			o->upload_id = strndup(p, strcspn(p, "<"));
			break;
		}
		case R_PART:
			o->parts[r->part - 1].etag = strdup(r->etag);
			memcpy(o->parts[r->part - 1].crc, r->crc, sizeof(r->crc));
			o->parts[r->part - 1].state = 2;
			o->parts_done++;
			o->sent += r->len;
			__atomic_fetch_add(&U.shm->uploaded_bytes, r->len, __ATOMIC_RELAXED);
			break;
		case R_COMPLETE:
			obj_finish(o, 0, NULL);
			break;
		case R_DELETE:
			obj_finish(o, 0, NULL);
			break;
		case R_ABORT:
			break;
		}
		req_free(r);
		return;
	}
	if (res != CURLE_OK)
		snprintf(why, sizeof(why), "%s", curl_easy_strerror(res));
	else
		error_text(r, code, why, sizeof(why));
	if (r->type == R_ABORT || (r->type == R_DELETE && code == 404)) {
		if (r->type == R_DELETE)
			obj_finish(o, 0, NULL); /* nothing to remove */
		req_free(r);
		return;
	}
	if (res != CURLE_OK)
		o->conn_lost = 1;
	/* the multipart upload is gone: S3 says NoSuchUpload; a server that
	 * restarted without its state may just fail (moto answers 500) */
	if (o->multipart && (r->type == R_PART || r->type == R_COMPLETE) && res == CURLE_OK &&
	    ((code == 404 && has_code(r, "NoSuchUpload")) || (code >= 500 && o->conn_lost))) {
		if (o->restarts < 5)
			obj_restart(o);
		else
			obj_finish(o, EIO, why);
		req_free(r);
		return;
	}
	transient = res != CURLE_OK || code >= 500 || code == 429 || code == 408 ||
		    has_code(r, "RequestTimeout") || has_code(r, "SlowDown") ||
		    /* a bucket that worked a moment ago: the server restarted */
		    (code == 404 && has_code(r, "NoSuchBucket") && U.bucket_ok);
	if (transient && ++r->attempt < MAX_ATTEMPTS) {
		/* one line per object until it succeeds again */
		hlog(o->warned ? 3 : 1, "s3://%s/%s: %s; retrying with backoff (up to %d attempts "
		     "per request)", U.c.bucket, o->key, why, MAX_ATTEMPTS);
		o->warned = 1;
		retry_later(r);
		/* the object's other parts wait as long */
		o->not_before = r->not_before;
		return;
	}
	refused = !transient && (code == 403 || code == 401 || has_code(r, "NoSuchBucket") ||
				 has_code(r, "InvalidAccessKeyId") || has_code(r, "SignatureDoesNotMatch") ||
				 has_code(r, "InvalidToken") || has_code(r, "ExpiredToken") ||
				 has_code(r, "TokenRefreshRequired"));
	if (refused && !U.refused) {
		U.refused = 1;
		hlog(0, "the object store refused an upload to s3://%s/%s: %s. Check the bucket "
		     "and the credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE, the MSC profile); the "
		     "checkpoints stay local and nothing more is uploaded by this process", U.c.bucket,
		     U.c.prefix, why);
	}
	if (o->multipart && o->upload_id) {
		struct req *a = req_new(o, R_ABORT, 0);

		if (a && U.active < U.c.concurrency + 4)
			req_start(a);
		else if (a)
			req_free(a);
	}
	if (o->state == O_RUNNING)
		obj_finish(o, refused ? EACCES : EIO, why);
	req_free(r);
}

static void *worker(void *arg)
{
	(void)arg;
	pthread_mutex_lock(&U.mu);
	for (;;) {
		CURLMsg *m;
		int running, left, timeout = 1000;
		uint64_t now;
		struct req *r;

		schedule();
		if (U.stop && !U.head && !U.active && !U.retry)
			break;
		pthread_mutex_unlock(&U.mu);
		curl_multi_perform(U.multi, &running);
		pthread_mutex_lock(&U.mu);
		while ((m = curl_multi_info_read(U.multi, &left)))
			if (m->msg == CURLMSG_DONE) {
				void *p = NULL;

				curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, &p);
				req_done(p, m->data.result);
			}
		schedule();
		now = now_ns();
		for (r = U.retry; r; r = r->next) {
			int ms = r->not_before > now ? (int)((r->not_before - now) / 1000000) + 1 : 0;

			if (ms < timeout)
				timeout = ms;
		}
		if (U.stop && !U.head && !U.active && !U.retry)
			break;
		pthread_mutex_unlock(&U.mu);
		curl_multi_poll(U.multi, NULL, 0, timeout, NULL);
		pthread_mutex_lock(&U.mu);
	}
	pthread_mutex_unlock(&U.mu);
	return NULL;
}

/* ---- the main thread's side ---- */

int upload_init(const struct ackpt_helper_config *cfg, struct ackpt_shm *shm)
{
	if (!cfg->upload_url[0])
		return 0;
	U.shm = shm;
	if (s3conf_resolve(&U.c, cfg) < 0) {
		U.on = -1;
		__atomic_store_n(&shm->upload_state, -1, __ATOMIC_RELEASE);
		return -1;
	}
	if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK || !(U.multi = curl_multi_init()) ||
	    (U.evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0) {
		hlog(0, "uploads to %s cannot start: libcurl could not be initialised", U.c.url);
		U.on = -1;
		__atomic_store_n(&shm->upload_state, -1, __ATOMIC_RELEASE);
		return -1;
	}
	curl_multi_setopt(U.multi, CURLMOPT_MAX_HOST_CONNECTIONS, (long)U.c.concurrency);
	srand((unsigned)getpid());
	for (int i = 0; i < READERS; i++)
		if (pthread_create(&U.reader[i], NULL, reader_main, NULL)) {
			hlog(0, "uploads to %s cannot start: no thread", U.c.url);
			U.on = -1;
			__atomic_store_n(&shm->upload_state, -1, __ATOMIC_RELEASE);
			return -1;
		}
	if (pthread_create(&U.thread, NULL, worker, NULL)) {
		hlog(0, "uploads to %s cannot start: no thread", U.c.url);
		U.on = -1;
		__atomic_store_n(&shm->upload_state, -1, __ATOMIC_RELEASE);
		return -1;
	}
	U.on = 1;
	__atomic_store_n(&shm->upload_state, 1, __ATOMIC_RELEASE);
	hlog(2, "uploading to s3://%s/%s at %s (region %s, parts of %llu MiB, %u at once)",
	     U.c.bucket, U.c.prefix, U.c.endpoint, U.c.region,
	     (unsigned long long)(U.c.part_size >> 20), U.c.concurrency);
	return 0;
}

static void enqueue(struct obj *o)
{
	pthread_mutex_lock(&U.mu);
	if (U.tail)
		U.tail->next = o;
	else
		U.head = o;
	U.tail = o;
	__atomic_fetch_add(&U.shm->uploads_pending, 1, __ATOMIC_RELAXED);
	pthread_mutex_unlock(&U.mu);
	curl_multi_wakeup(U.multi);
}

static struct obj *obj_new(enum obj_kind kind, const char *path, char *key, uint64_t seq)
{
	struct obj *o = calloc(1, sizeof(*o));

	if (!o || !(o->path = strdup(path))) {
		free(o);
		free(key);
		return NULL;
	}
	o->kind = kind;
	o->key = key;
	o->seq = seq;
	o->fd = -1;
	return o;
}

static void lost(const char *path, const char *key)
{
	__atomic_fetch_add(&U.shm->upload_failures, 1, __ATOMIC_RELAXED);
	pthread_mutex_lock(&U.mu);
	U.failed_flags |= UPLOAD_F_FAILED;
	pthread_mutex_unlock(&U.mu);
	hlog(0, "upload of %s to s3://%s/%s failed for good: %s", path, U.c.bucket,
	     key ? key : "?", strerror(errno ? errno : ENOMEM));
}

void upload_file(int fd, const char *path, uint64_t seq)
{
	char proc[64];
	struct obj *o;
	char *key;

	if (U.on < 0 && path && !is_metadata_temp(path)) {
		/* uploads were asked for and cannot work (said at start) */
		__atomic_fetch_add(&U.shm->upload_failures, 1, __ATOMIC_RELAXED);
		return;
	}
	if (U.on <= 0 || !path || is_metadata_temp(path) || !(key = key_of(path)))
		return;
	o = obj_new(OBJ_FILE, path, key, seq);
	if (!o) {
		lost(path, NULL);
		return;
	}
	/* our own description, for reading: the file may be renamed or
	 * removed by the time its parts are read */
	snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
	o->fd = open(proc, O_RDONLY | O_CLOEXEC);
	if (o->fd < 0) {
		lost(path, o->key);
		obj_free(o);
		return;
	}
	enqueue(o);
}

void upload_renamed(const char *oldp, const char *newp, uint64_t seq)
{
	char *okey, *nkey;
	struct obj *o;
	int fd;

	if (U.on <= 0)
		return;
	okey = key_of(oldp);
	nkey = key_of(newp);
	if (!okey && !nkey)
		return;
	if (nkey && !is_metadata_temp(newp)) {
		fd = open(newp, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
		if (fd >= 0) {
			o = obj_new(OBJ_FILE, newp, nkey, seq);
			if (o) {
				o->fd = fd;
				enqueue(o);
			} else {
				close(fd);
			}
		} else {
			free(nkey);
		}
	} else {
		free(nkey);
	}
	/* the old name is gone locally: so is its object */
	if (okey && (o = obj_new(OBJ_DELETE, oldp, okey, seq)))
		enqueue(o);
}

int upload_done_upto(uint64_t seq, uint32_t *flags)
{
	struct obj *o;
	int done = 1;

	*flags = 0;
	if (U.on <= 0) {
		if (U.on < 0)
			*flags = UPLOAD_F_FAILED;
		return 1;
	}
	pthread_mutex_lock(&U.mu);
	for (o = U.head; o; o = o->next)
		if (o->kind != OBJ_MARKER && o->seq <= seq && (o->state == O_QUEUED || o->state == O_RUNNING))
			done = 0;
	if (done) {
		*flags = U.failed_flags;
		U.failed_flags = 0;
	}
	pthread_mutex_unlock(&U.mu);
	return done;
}

void upload_marker(uint64_t commit_id, const char *tmp, const char *final, int tmp_was_uploaded)
{
	struct obj *o;
	char *key;
	unsigned i;

	pthread_mutex_lock(&U.mu);
	for (i = 0; i < U.nmarkers; i++)
		if (U.markers[i].result != 1)
			break;
	if (i == U.nmarkers && U.nmarkers < 64)
		U.nmarkers++;
	if (i < 64) {
		U.markers[i].id = commit_id;
		U.markers[i].result = 1;
	}
	pthread_mutex_unlock(&U.mu);
	if (!(key = key_of(final)) || !(o = obj_new(OBJ_MARKER, final, key, commit_id)) ||
	    (o->fd = open(tmp, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)) < 0) {
		int e = errno ? errno : ENOMEM;

		if (key && o)
			obj_free(o);
		pthread_mutex_lock(&U.mu);
		for (i = 0; i < U.nmarkers; i++)
			if (U.markers[i].id == commit_id)
				U.markers[i].result = key ? -e : 0; /* no key: not ours to upload */
		pthread_mutex_unlock(&U.mu);
		if (key)
			lost(final, NULL);
		return;
	}
	enqueue(o);
	/* the program's own temporary (DCP's .metadata.tmp) went up as a
	 * file at its close; the rename into the marker takes it away */
	if (tmp_was_uploaded && (key = key_of(tmp)) && (o = obj_new(OBJ_DELETE, tmp, key, commit_id)))
		enqueue(o);
}

int upload_marker_result(uint64_t commit_id)
{
	unsigned i;
	int r = 0;

	pthread_mutex_lock(&U.mu);
	for (i = 0; i < U.nmarkers; i++)
		if (U.markers[i].id == commit_id) {
			r = U.markers[i].result;
			if (r != 1)
				U.markers[i].id = 0;
			break;
		}
	pthread_mutex_unlock(&U.mu);
	return r;
}

uint64_t upload_seq(uint64_t durable)
{
	struct obj *o;

	if (U.on <= 0)
		return durable;
	pthread_mutex_lock(&U.mu);
	for (o = U.head; o; o = o->next)
		if (o->kind != OBJ_MARKER && (o->state == O_QUEUED || o->state == O_RUNNING) &&
		    o->seq <= durable)
			durable = o->seq - 1;
	pthread_mutex_unlock(&U.mu);
	return durable;
}

int upload_idle(void)
{
	int idle;

	if (U.on <= 0)
		return 1;
	pthread_mutex_lock(&U.mu);
	idle = !U.head && !U.active && !U.retry;
	pthread_mutex_unlock(&U.mu);
	return idle;
}

void upload_finish(void)
{
	unsigned i;

	if (U.on <= 0)
		return;
	pthread_mutex_lock(&U.mu);
	U.stop = 1;
	pthread_mutex_unlock(&U.mu);
	curl_multi_wakeup(U.multi);
	pthread_join(U.thread, NULL);
	pthread_mutex_lock(&U.mu);
	pthread_cond_broadcast(&U.rcond);
	pthread_mutex_unlock(&U.mu);
	for (int i = 0; i < READERS; i++)
		pthread_join(U.reader[i], NULL);
	if (U.nfailed) {
		hlog(0, "%u object(s) were not uploaded to s3://%s:", U.nfailed, U.c.bucket);
		for (i = 0; i < U.nfailed && i < 20; i++)
			hlog(0, "  not uploaded: s3://%s/%s", U.c.bucket, U.failed_keys[i]);
		if (U.nfailed > 20)
			hlog(0, "  ... and %u more", U.nfailed - 20);
	}
	curl_multi_cleanup(U.multi);
	U.on = 0;
}
