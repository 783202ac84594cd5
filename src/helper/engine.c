/*
 * io_uring and pwrite-pool engines behind one small interface (engine.h).
 * The pool exists for kernels or sandboxes where io_uring_setup fails
 * (EPERM from kernel.io_uring_disabled or seccomp, ENOSYS).
 */
#include "engine.h"

#include <errno.h>
#include <liburing.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include "proto.h"

struct pool_job {
	struct engine_req req;
	long res;
	struct pool_job *next;
};

struct engine {
	int uring;
	int efd;
	unsigned inflight;
	/* io_uring */
	struct io_uring ring;
	unsigned depth;
	unsigned queued;
	int fixed;
	/* pool */
	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct pool_job *todo_head, *todo_tail;
	struct pool_job *done;
	unsigned nthreads;
};

struct engine *engine_open_uring(unsigned depth, int *err)
{
	struct engine *e = calloc(1, sizeof(*e));
	int ret;

	if (!e) {
		*err = -ENOMEM;
		return NULL;
	}
	e->uring = 1;
	e->depth = depth;
	ret = io_uring_queue_init(depth, &e->ring, 0);
	if (ret < 0) {
		*err = ret;
		free(e);
		return NULL;
	}
	e->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (e->efd < 0 || io_uring_register_eventfd(&e->ring, e->efd) < 0) {
		*err = -errno ? -errno : -EINVAL;
		io_uring_queue_exit(&e->ring);
		if (e->efd >= 0)
			close(e->efd);
		free(e);
		return NULL;
	}
	return e;
}

int engine_register(struct engine *e, void *base, size_t len)
{
	struct iovec iov[64];
	unsigned n = 0;
	size_t off;
	int ret;

	if (!e->uring)
		return -EOPNOTSUPP;
	for (off = 0; off < len && n < 64; off += ACKPT_REG_BUF_MAX, n++) {
		iov[n].iov_base = (char *)base + off;
		iov[n].iov_len = len - off < ACKPT_REG_BUF_MAX ? len - off : ACKPT_REG_BUF_MAX;
	}
	if (off < len)
		return -E2BIG;
	ret = io_uring_register_buffers(&e->ring, iov, n);
	if (ret == 0)
		e->fixed = 1;
	return ret;
}

static void *pool_main(void *arg)
{
	struct engine *e = arg;

	for (;;) {
		struct pool_job *j;
		const struct engine_req *r;
		uint64_t one = 1;

		pthread_mutex_lock(&e->lock);
		while (!e->todo_head)
			pthread_cond_wait(&e->cond, &e->lock);
		j = e->todo_head;
		e->todo_head = j->next;
		if (!e->todo_head)
			e->todo_tail = NULL;
		pthread_mutex_unlock(&e->lock);

		r = &j->req;
		if (r->kind == ENGINE_WRITE) {
			ssize_t n = pwrite(r->fd, r->buf, r->len, r->off);
			j->res = n < 0 ? -errno : n;
		} else {
			j->res = fsync(r->fd) < 0 ? -errno : 0;
		}

		pthread_mutex_lock(&e->lock);
		j->next = e->done;
		e->done = j;
		pthread_mutex_unlock(&e->lock);
		if (write(e->efd, &one, sizeof(one)) < 0) {
			/* eventfd counter saturation is impossible at our rates */
		}
	}
	return NULL;
}

struct engine *engine_open_pool(unsigned threads, int *err)
{
	struct engine *e = calloc(1, sizeof(*e));
	unsigned i;

	if (!e) {
		*err = -ENOMEM;
		return NULL;
	}
	pthread_mutex_init(&e->lock, NULL);
	pthread_cond_init(&e->cond, NULL);
	e->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (e->efd < 0) {
		*err = -errno;
		free(e);
		return NULL;
	}
	for (i = 0; i < threads; i++) {
		pthread_t t;
		if (pthread_create(&t, NULL, pool_main, e) == 0) {
			pthread_detach(t);
			e->nthreads++;
		}
	}
	if (!e->nthreads) {
		*err = -EAGAIN;
		close(e->efd);
		free(e);
		return NULL;
	}
	return e;
}

int engine_event_fd(struct engine *e) { return e->efd; }
int engine_is_uring(struct engine *e) { return e->uring; }
int engine_has_fixed(struct engine *e) { return e->fixed; }
unsigned engine_inflight(struct engine *e) { return e->inflight; }

int engine_queue(struct engine *e, const struct engine_req *r)
{
	if (e->uring) {
		struct io_uring_sqe *sqe = io_uring_get_sqe(&e->ring);

		if (!sqe) {
			io_uring_submit(&e->ring);
			e->queued = 0;
			sqe = io_uring_get_sqe(&e->ring);
			if (!sqe)
				return -EBUSY;
		}
		if (r->kind == ENGINE_WRITE) {
			if (r->fixed_index >= 0 && e->fixed)
				io_uring_prep_write_fixed(sqe, r->fd, r->buf, r->len, r->off,
							  r->fixed_index);
			else
				io_uring_prep_write(sqe, r->fd, r->buf, r->len, r->off);
		} else {
			io_uring_prep_fsync(sqe, r->fd, 0);
		}
		io_uring_sqe_set_data(sqe, r->tag);
		e->queued++;
	} else {
		struct pool_job *j = calloc(1, sizeof(*j));

		if (!j)
			return -ENOMEM;
		j->req = *r;
		pthread_mutex_lock(&e->lock);
		if (e->todo_tail)
			e->todo_tail->next = j;
		else
			e->todo_head = j;
		e->todo_tail = j;
		pthread_cond_signal(&e->cond);
		pthread_mutex_unlock(&e->lock);
	}
	e->inflight++;
	return 0;
}

int engine_flush(struct engine *e)
{
	int ret = 0;

	if (e->uring && e->queued) {
		ret = io_uring_submit(&e->ring);
		e->queued = 0;
	}
	return ret < 0 ? ret : 0;
}

int engine_reap(struct engine *e, void (*cb)(void *tag, long res, void *arg), void *arg)
{
	uint64_t v;
	int n = 0;

	if (read(e->efd, &v, sizeof(v)) < 0) {
		/* EAGAIN: nothing signalled; still peek below */
	}
	if (e->uring) {
		struct io_uring_cqe *cqe;

		while (io_uring_peek_cqe(&e->ring, &cqe) == 0) {
			void *tag = io_uring_cqe_get_data(cqe);
			long res = cqe->res;

			io_uring_cqe_seen(&e->ring, cqe);
			e->inflight--;
			n++;
			cb(tag, res, arg);
		}
	} else {
		struct pool_job *list;

		pthread_mutex_lock(&e->lock);
		list = e->done;
		e->done = NULL;
		pthread_mutex_unlock(&e->lock);
		while (list) {
			struct pool_job *j = list;

			list = j->next;
			e->inflight--;
			n++;
			cb(j->req.tag, j->res, arg);
			free(j);
		}
	}
	return n;
}
