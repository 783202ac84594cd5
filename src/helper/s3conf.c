/*
 * Where uploads go, and as whom: the bucket and prefix from the URL
 * (s3://bucket/prefix, or msc://profile/path through a Multi-Storage Client
 * config file), the endpoint, region and credentials from the MSC profile
 * or by AWS conventions (environment, then ~/.aws/credentials and
 * ~/.aws/config under AWS_PROFILE).  Every problem is one line naming the
 * variable, file or field; a secret is never printed.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#if ACKPT_HAVE_MSC
#include <yaml.h>
#endif

#include "helper.h"
#include "proto.h"
#include "upload.h"

#define DEFAULT_PART (16ull << 20)
#define DEFAULT_CONC 8

static char *dup_or_null(const char *s) { return s && *s ? strdup(s) : NULL; }

static const char *env(const char *name)
{
	const char *v = getenv(name);

	return v && *v ? v : NULL;
}

/* ---- AWS shared files (INI) ---- */

/* key in [section] of file; a fresh string or NULL */
static char *ini_get(const char *file, const char *section, const char *key)
{
	char line[4096], *val = NULL;
	int in = 0;
	FILE *f = fopen(file, "re");

	if (!f)
		return NULL;
	while (fgets(line, sizeof(line), f)) {
		char *s = line, *e, *eq;

		while (*s == ' ' || *s == '\t')
			s++;
		e = s + strlen(s);
		while (e > s && (e[-1] == '\n' || e[-1] == '\r' || e[-1] == ' ' || e[-1] == '\t'))
			*--e = 0;
		if (*s == '#' || *s == ';' || !*s)
			continue;
		if (*s == '[') {
			char *close = strchr(s, ']');

			if (close)
				*close = 0;
			s++;
			while (*s == ' ')
				s++;
			in = !strcmp(s, section);
			continue;
		}
		if (!in || !(eq = strchr(s, '=')))
			continue;
		e = eq;
		while (e > s && (e[-1] == ' ' || e[-1] == '\t'))
			e--;
		if ((size_t)(e - s) != strlen(key) || strncmp(s, key, (size_t)(e - s)))
			continue;
		eq++;
		while (*eq == ' ' || *eq == '\t')
			eq++;
		free(val);
		val = strdup(eq);
	}
	fclose(f);
	return val;
}

static void aws_file(char *out, size_t cap, const char *var, const char *name)
{
	const char *home = env("HOME");

	if (env(var))
		snprintf(out, cap, "%s", env(var));
	else
		snprintf(out, cap, "%s/.aws/%s", home ? home : "/root", name);
}

/* From the shared credentials file, then the config file: a profile's key. */
static char *aws_profile_get(const char *profile, const char *key, int config_only)
{
	char cred[4096], conf[4096], section[512];
	char *v = NULL;

	aws_file(cred, sizeof(cred), "AWS_SHARED_CREDENTIALS_FILE", "credentials");
	aws_file(conf, sizeof(conf), "AWS_CONFIG_FILE", "config");
	if (!config_only)
		v = ini_get(cred, profile, key);
	if (!v) {
		if (!strcmp(profile, "default"))
			snprintf(section, sizeof(section), "default");
		else
			snprintf(section, sizeof(section), "profile %s", profile);
		v = ini_get(conf, section, key);
	}
	return v;
}

#if ACKPT_HAVE_MSC
/* ---- the MSC config (YAML) ---- */

struct msc {
	yaml_document_t doc;
	int loaded;
	char path[4096];
};

static yaml_node_t *map_get(yaml_document_t *d, yaml_node_t *map, const char *key)
{
	yaml_node_pair_t *p;

	if (!map || map->type != YAML_MAPPING_NODE)
		return NULL;
	for (p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top; p++) {
		yaml_node_t *k = yaml_document_get_node(d, p->key);

		if (k && k->type == YAML_SCALAR_NODE && !strcmp((char *)k->data.scalar.value, key))
			return yaml_document_get_node(d, p->value);
	}
	return NULL;
}

/* The first key of map not in allowed (NULL-terminated), or NULL. */
static const char *map_unknown(yaml_document_t *d, yaml_node_t *map, const char *const *allowed)
{
	yaml_node_pair_t *p;

	if (!map || map->type != YAML_MAPPING_NODE)
		return NULL;
	for (p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top; p++) {
		yaml_node_t *k = yaml_document_get_node(d, p->key);
		const char *const *a;

		if (!k || k->type != YAML_SCALAR_NODE)
			return "(a key that is not a string)";
		for (a = allowed; *a; a++)
			if (!strcmp(*a, (char *)k->data.scalar.value))
				break;
		if (!*a)
			return (char *)k->data.scalar.value;
	}
	return NULL;
}

/* A scalar with ${VAR} and $VAR expanded, as MSC does; NULL with *bad set
 * to the unset variable's name (static) when one is missing. */
static char *scalar_expand(yaml_node_t *n, const char **bad)
{
	static char missing[256];
	const char *s;
	size_t cap = 256, o = 0;
	char *out;

	if (!n || n->type != YAML_SCALAR_NODE)
		return NULL;
	s = (char *)n->data.scalar.value;
	out = malloc(cap);
	while (out && *s) {
		const char *v = NULL;
		char name[256];
		size_t add;

		if (s[0] == '$' && (s[1] == '{' || s[1] == '_' || (s[1] >= 'A' && s[1] <= 'Z') ||
				    (s[1] >= 'a' && s[1] <= 'z'))) {
			size_t k = 0;

			if (s[1] == '{') {
				const char *e = strchr(s + 2, '}');

				if (!e || (size_t)(e - s - 2) >= sizeof(name)) {
					snprintf(missing, sizeof(missing), "%s", s);
					*bad = missing;
					free(out);
					return NULL;
				}
				memcpy(name, s + 2, (size_t)(e - s - 2));
				name[e - s - 2] = 0;
				s = e + 1;
			} else {
				s++;
				while ((*s == '_' || (*s >= 'A' && *s <= 'Z') || (*s >= 'a' && *s <= 'z') ||
					(*s >= '0' && *s <= '9')) && k + 1 < sizeof(name))
					name[k++] = *s++;
				name[k] = 0;
			}
			v = getenv(name);
			if (!v) {
				snprintf(missing, sizeof(missing), "%s", name);
				*bad = missing;
				free(out);
				return NULL;
			}
		}
		add = v ? strlen(v) : 1;
		if (o + add + 1 > cap) {
			char *b;

			cap = (o + add + 1) * 2;
			b = realloc(out, cap);
			if (!b) {
				free(out);
				return NULL;
			}
			out = b;
		}
		if (v) {
			memcpy(out + o, v, add);
			o += add;
		} else {
			out[o++] = *s++;
		}
	}
	if (out)
		out[o] = 0;
	return out;
}

static int msc_find(struct msc *m)
{
	const char *home = env("HOME"), *xdg = env("XDG_CONFIG_HOME"), *dirs = env("XDG_CONFIG_DIRS");
	char cand[16][4096];
	int n = 0, i;
	const char *v = env("MSC_CONFIG");

	if (v)
		snprintf(cand[n++], 4096, "%s", v);
	if (xdg) {
		snprintf(cand[n++], 4096, "%s/msc/config.yaml", xdg);
		snprintf(cand[n++], 4096, "%s/msc/config.json", xdg);
	}
	if (home) {
		snprintf(cand[n++], 4096, "%s/.msc_config.yaml", home);
		snprintf(cand[n++], 4096, "%s/.msc_config.json", home);
		snprintf(cand[n++], 4096, "%s/.config/msc/config.yaml", home);
		snprintf(cand[n++], 4096, "%s/.config/msc/config.json", home);
	}
	{
		char d[4096], *save = NULL, *tok;

		snprintf(d, sizeof(d), "%s", dirs ? dirs : "/etc/xdg");
		for (tok = strtok_r(d, ":", &save); tok && n + 4 <= 16; tok = strtok_r(NULL, ":", &save)) {
			snprintf(cand[n++], 4096, "%s/msc/config.yaml", tok);
			snprintf(cand[n++], 4096, "%s/msc/config.json", tok);
		}
	}
	if (n + 2 <= 16) {
		snprintf(cand[n++], 4096, "/etc/msc_config.yaml");
		snprintf(cand[n++], 4096, "/etc/msc_config.json");
	}
	for (i = 0; i < n; i++)
		if (access(cand[i], F_OK) == 0) {
			snprintf(m->path, sizeof(m->path), "%s", cand[i]);
			return 0;
		}
	return -ENOENT;
}

static int msc_load(struct msc *m)
{
	yaml_parser_t p;
	FILE *f;
	int ok;

	if (msc_find(m) < 0) {
		hlog(0, "ACKPT_UPLOAD: an msc:// URL needs a Multi-Storage Client config file: set "
		     "MSC_CONFIG, or create ~/.msc_config.yaml");
		return -EINVAL;
	}
	f = fopen(m->path, "re");
	if (!f) {
		hlog(0, "ACKPT_UPLOAD: cannot read the MSC config %s: %s", m->path, strerror(errno));
		return -EINVAL;
	}
	yaml_parser_initialize(&p);
	yaml_parser_set_input_file(&p, f);
	ok = yaml_parser_load(&p, &m->doc);
	if (!ok || !yaml_document_get_root_node(&m->doc)) {
		hlog(0, "ACKPT_UPLOAD: the MSC config %s is not valid YAML (line %zu: %s)", m->path,
		     p.problem_mark.line + 1, p.problem ? p.problem : "empty document");
		if (ok)
			yaml_document_delete(&m->doc);
		yaml_parser_delete(&p);
		fclose(f);
		return -EINVAL;
	}
	yaml_parser_delete(&p);
	fclose(f);
	m->loaded = 1;
	return 0;
}

static int parse_bool(const char *s, int *out)
{
	if (!strcasecmp(s, "true") || !strcasecmp(s, "yes") || !strcmp(s, "1")) {
		*out = 1;
		return 0;
	}
	if (!strcasecmp(s, "false") || !strcasecmp(s, "no") || !strcmp(s, "0")) {
		*out = 0;
		return 0;
	}
	return -1;
}

/* Fill c from profile `name`; path is what follows the profile in the URL. */
static int msc_profile(struct s3conf *c, const char *name, const char *path, char **aws_profile,
		       uint64_t *part, unsigned *conc)
{
	static const char *const prof_keys[] = { "storage_provider", "credentials_provider", "comment",
						 NULL };
	static const char *const sp_keys[] = { "type", "options", NULL };
	static const char *const opt_keys[] = { "base_path", "endpoint_url", "region_name",
						"profile_name", "verify", "s3", "multipart_chunksize",
						"max_concurrency", NULL };
	static const char *const s3_keys[] = { "addressing_style", NULL };
	static const char *const cp_keys[] = { "type", "options", NULL };
	static const char *const cred_keys[] = { "access_key", "secret_key", "session_token", NULL };
	struct msc m = { 0 };
	yaml_document_t *d = &m.doc;
	yaml_node_t *root, *prof, *sp, *opt, *cp, *n;
	const char *unk, *bad = NULL;
	char *v = NULL, *base = NULL;
	int ret = -EINVAL;

	if (msc_load(&m) < 0)
		return -EINVAL;
	root = yaml_document_get_root_node(d);
	prof = map_get(d, map_get(d, root, "profiles"), name);
#define FAIL(...) do { hlog(0, __VA_ARGS__); goto out; } while (0)
#define STR(node, dst, what)                                                                   \
	do {                                                                                   \
		free(dst);                                                                     \
		dst = scalar_expand(node, &bad);                                               \
		if (!dst)                                                                      \
			FAIL("ACKPT_UPLOAD: in the MSC config %s, profile \"%s\": %s %s", m.path, \
			     name, what, bad ? "names an unset environment variable" : "must be a string"); \
	} while (0)
	if (!prof)
		FAIL("ACKPT_UPLOAD: the MSC config %s has no profile \"%s\"", m.path, name);
	if ((unk = map_unknown(d, prof, prof_keys)))
		FAIL("ACKPT_UPLOAD: in the MSC config %s, profile \"%s\": \"%s\" is not supported "
		     "(ackpt reads storage_provider and credentials_provider)", m.path, name, unk);
	sp = map_get(d, prof, "storage_provider");
	if (!sp || (unk = map_unknown(d, sp, sp_keys)))
		FAIL("ACKPT_UPLOAD: in the MSC config %s, profile \"%s\": %s", m.path, name,
		     sp ? "storage_provider takes only type and options" : "no storage_provider");
	STR(map_get(d, sp, "type"), v, "storage_provider.type");
	if (strcmp(v, "s3") && strcmp(v, "s8k"))
		FAIL("ACKPT_UPLOAD: in the MSC config %s, profile \"%s\": storage_provider type \"%s\" "
		     "is not supported (ackpt uploads to s3 and s8k)", m.path, name, v);
	opt = map_get(d, sp, "options");
	if ((unk = map_unknown(d, opt, opt_keys)))
		FAIL("ACKPT_UPLOAD: in the MSC config %s, profile \"%s\": option \"%s\" is not "
		     "supported (ackpt reads base_path, endpoint_url, region_name, profile_name, "
		     "verify, s3.addressing_style, multipart_chunksize, max_concurrency)", m.path, name, unk);
	if (!(n = map_get(d, opt, "base_path")))
		FAIL("ACKPT_UPLOAD: in the MSC config %s, profile \"%s\": options.base_path is missing",
		     m.path, name);
	STR(n, base, "options.base_path");
	{
		char *s = base, *slash, *pre;

		while (*s == '/')
			s++;
		slash = strchr(s, '/');
		c->bucket = slash ? strndup(s, (size_t)(slash - s)) : strdup(s);
		pre = slash ? slash + 1 : "";
		if (asprintf(&c->prefix, "%s%s%s", pre, *pre && *path ? "/" : "", path) < 0)
			c->prefix = NULL;
	}
	if ((n = map_get(d, opt, "endpoint_url"))) {
		STR(n, v, "options.endpoint_url");
		c->endpoint = dup_or_null(v);
	}
	if ((n = map_get(d, opt, "region_name"))) {
		STR(n, v, "options.region_name");
		c->region = dup_or_null(v);
	}
	if ((n = map_get(d, opt, "profile_name"))) {
		STR(n, v, "options.profile_name");
		*aws_profile = dup_or_null(v);
	}
	if ((n = map_get(d, opt, "verify"))) {
		STR(n, v, "options.verify");
		if (parse_bool(v, &c->verify_tls) < 0)
			FAIL("ACKPT_UPLOAD: in the MSC config %s, profile \"%s\": options.verify must "
			     "be true or false (a CA bundle path is not supported)", m.path, name);
	}
	if ((n = map_get(d, opt, "s3"))) {
		if ((unk = map_unknown(d, n, s3_keys)))
			FAIL("ACKPT_UPLOAD: in the MSC config %s, profile \"%s\": option s3.%s is not "
			     "supported (ackpt reads s3.addressing_style)", m.path, name, unk);
		if (map_get(d, n, "addressing_style")) {
			STR(map_get(d, n, "addressing_style"), v, "s3.addressing_style");
			if (strcmp(v, "path") && strcmp(v, "virtual") && strcmp(v, "auto"))
				FAIL("ACKPT_UPLOAD: in the MSC config %s, profile \"%s\": "
				     "s3.addressing_style must be path, virtual or auto", m.path, name);
			c->path_style = !strcmp(v, "path") ? 1 : !strcmp(v, "virtual") ? 0 : -1;
		}
	}
	if ((n = map_get(d, opt, "multipart_chunksize"))) {
		STR(n, v, "options.multipart_chunksize");
		*part = strtoull(v, NULL, 10);
	}
	if ((n = map_get(d, opt, "max_concurrency"))) {
		STR(n, v, "options.max_concurrency");
		*conc = (unsigned)strtoul(v, NULL, 10);
	}
	if ((cp = map_get(d, prof, "credentials_provider"))) {
		yaml_node_t *co = map_get(d, cp, "options");

		if ((unk = map_unknown(d, cp, cp_keys)))
			FAIL("ACKPT_UPLOAD: in the MSC config %s, profile \"%s\": credentials_provider "
			     "takes only type and options", m.path, name);
		STR(map_get(d, cp, "type"), v, "credentials_provider.type");
		if (strcmp(v, "S3Credentials"))
			FAIL("ACKPT_UPLOAD: in the MSC config %s, profile \"%s\": credentials_provider "
			     "type \"%s\" is not supported (ackpt reads S3Credentials; or leave it out "
			     "for the AWS variables and files)", m.path, name, v);
		if ((unk = map_unknown(d, co, cred_keys)))
			FAIL("ACKPT_UPLOAD: in the MSC config %s, profile \"%s\": credentials option "
			     "\"%s\" is not supported (access_key, secret_key, session_token)", m.path,
			     name, unk);
		STR(map_get(d, co, "access_key"), c->access_key, "credentials_provider access_key");
		STR(map_get(d, co, "secret_key"), c->secret_key, "credentials_provider secret_key");
		if (map_get(d, co, "session_token"))
			STR(map_get(d, co, "session_token"), c->session_token,
			    "credentials_provider session_token");
	}
#undef STR
#undef FAIL
	ret = c->bucket && *c->bucket && c->prefix ? 0 : -EINVAL;
	if (ret)
		hlog(0, "ACKPT_UPLOAD: in the MSC config %s, profile \"%s\": base_path names no bucket",
		     m.path, name);
out:
	free(v);
	free(base);
	yaml_document_delete(d);
	return ret;
}

#else
static int msc_profile(struct s3conf *c, const char *name, const char *path, char **aws_profile,
		       uint64_t *part, unsigned *conc)
{
	hlog(0, "ACKPT_UPLOAD: this ackpt was built without libyaml, so it cannot read an MSC "
	     "config for msc://%s (use s3://, or rebuild with libyaml-dev: meson setup -Dmsc=enabled)",
	     name);
	return -EINVAL;
}
#endif

static void trim_slashes(char *s)
{
	size_t n = strlen(s), i = 0;

	while (s[i] == '/')
		i++;
	memmove(s, s + i, n - i + 1);
	n = strlen(s);
	while (n && s[n - 1] == '/')
		s[--n] = 0;
}

int s3conf_resolve(struct s3conf *c, const struct ackpt_helper_config *cfg)
{
	const char *url = cfg->upload_url;
	char *aws_profile = NULL;
	uint64_t part = 0;
	unsigned conc = 0;

	memset(c, 0, sizeof(*c));
	c->url = strdup(url);
	c->verify_tls = 1;
	c->path_style = -1;
	if (!strncmp(url, "s3://", 5)) {
		const char *b = url + 5, *slash = strchr(b, '/');

		c->bucket = slash ? strndup(b, (size_t)(slash - b)) : strdup(b);
		c->prefix = strdup(slash ? slash + 1 : "");
	} else if (!strncmp(url, "msc://", 6)) {
		const char *p = url + 6, *slash = strchr(p, '/');
		char *prof = slash ? strndup(p, (size_t)(slash - p)) : strdup(p);
		char *rest = strdup(slash ? slash + 1 : "");
		int ret = prof && rest ? 0 : -ENOMEM;

		if (!ret) {
			trim_slashes(rest);
			ret = msc_profile(c, prof, rest, &aws_profile, &part, &conc);
		}
		free(prof);
		free(rest);
		if (ret < 0) {
			free(aws_profile);
			s3conf_free(c);
			return -EINVAL;
		}
	}
	if (!c->bucket || !c->prefix) {
		s3conf_free(c);
		return -ENOMEM;
	}
	trim_slashes(c->prefix);
	/* which AWS profile: the MSC option, else AWS_PROFILE, else default */
	if (!aws_profile)
		aws_profile = strdup(env("AWS_PROFILE") ? env("AWS_PROFILE") : "default");
	if (!c->region)
		c->region = dup_or_null(env("AWS_REGION"));
	if (!c->region)
		c->region = dup_or_null(env("AWS_DEFAULT_REGION"));
	if (!c->region && aws_profile)
		c->region = aws_profile_get(aws_profile, "region", 1);
	if (!c->region)
		c->region = strdup("us-east-1");
	if (!c->endpoint)
		c->endpoint = dup_or_null(env("AWS_ENDPOINT_URL_S3"));
	if (!c->endpoint)
		c->endpoint = dup_or_null(env("AWS_ENDPOINT_URL"));
	if (!c->endpoint && aws_profile)
		c->endpoint = aws_profile_get(aws_profile, "endpoint_url", 1);
	if (c->endpoint) {
		size_t n = strlen(c->endpoint);

		while (n && c->endpoint[n - 1] == '/')
			c->endpoint[--n] = 0;
		if (strncmp(c->endpoint, "http://", 7) && strncmp(c->endpoint, "https://", 8)) {
			hlog(0, "ACKPT_UPLOAD: the endpoint \"%s\" (AWS_ENDPOINT_URL or the profile's "
			     "endpoint_url) must start with http:// or https://", c->endpoint);
			free(aws_profile);
			s3conf_free(c);
			return -EINVAL;
		}
		if (c->path_style < 0)
			c->path_style = 1; /* custom endpoints: the bucket goes in the path */
	} else {
		if (asprintf(&c->endpoint, "https://s3.%s.amazonaws.com", c->region) < 0)
			c->endpoint = NULL;
		if (c->path_style < 0)
			c->path_style = strchr(c->bucket, '.') != NULL; /* TLS names have no dots */
	}
	/* credentials: the MSC profile's, else the environment, else the files */
	if (!c->access_key && env("AWS_ACCESS_KEY_ID") && env("AWS_SECRET_ACCESS_KEY")) {
		c->access_key = strdup(env("AWS_ACCESS_KEY_ID"));
		c->secret_key = strdup(env("AWS_SECRET_ACCESS_KEY"));
		c->session_token = dup_or_null(env("AWS_SESSION_TOKEN"));
	}
	if (!c->access_key && aws_profile) {
		c->access_key = aws_profile_get(aws_profile, "aws_access_key_id", 0);
		c->secret_key = aws_profile_get(aws_profile, "aws_secret_access_key", 0);
		c->session_token = aws_profile_get(aws_profile, "aws_session_token", 0);
	}
	if (!c->access_key || !c->secret_key || !*c->access_key || !*c->secret_key) {
		hlog(0, "ACKPT_UPLOAD: no credentials for %s: set AWS_ACCESS_KEY_ID and "
		     "AWS_SECRET_ACCESS_KEY, or a profile in ~/.aws/credentials (AWS_PROFILE=%s), or "
		     "an S3Credentials credentials_provider in the MSC profile", url,
		     aws_profile ? aws_profile : "default");
		free(aws_profile);
		s3conf_free(c);
		return -EINVAL;
	}
	free(aws_profile);
	c->part_size = cfg->upload_part_size ? cfg->upload_part_size : part ? part : DEFAULT_PART;
	if (c->part_size < (5ull << 20)) {
		hlog(0, "ACKPT_UPLOAD: the MSC profile's multipart_chunksize %llu is below S3's "
		     "minimum part of 5 MiB", (unsigned long long)c->part_size);
		s3conf_free(c);
		return -EINVAL;
	}
	c->concurrency = cfg->upload_concurrency ? cfg->upload_concurrency : conc ? conc : DEFAULT_CONC;
	if (c->concurrency > 256)
		c->concurrency = 256;
	if (!c->endpoint || !c->region || !*c->bucket) {
		hlog(0, "ACKPT_UPLOAD: %s names no bucket", url);
		s3conf_free(c);
		return -EINVAL;
	}
	return 0;
}

void s3conf_free(struct s3conf *c)
{
	free(c->url);
	free(c->bucket);
	free(c->prefix);
	free(c->endpoint);
	free(c->region);
	free(c->access_key);
	if (c->secret_key)
		memset(c->secret_key, 0, strlen(c->secret_key));
	free(c->secret_key);
	free(c->session_token);
	memset(c, 0, sizeof(*c));
}
