"""A real moto S3 server for the upload tests (test_upload.py).

MotoServer starts `moto.server` in a subprocess on a free loopback port
(its log goes to a file), waits until it answers, and gives a boto3
client for checking what arrived.  It can be SIGKILLed and restarted on the
same port (moto keeps no state across a restart: the buckets it had are made
again *before* the port opens, so a client retrying against the new server
never sees a NoSuchBucket window), and it can run with authentication
enforced (an IAM user with an s3:* policy; wrong secrets then get 403
SignatureDoesNotMatch, unknown keys 403 InvalidAccessKeyId).

The server process is this file run as a script:
  python s3util.py serve --port P --state STATE.json [--bucket B]... [--auth]
       [--key-id K --secret S]
It prepares moto's in-memory backends (buckets, IAM user and key) in-process
and then runs moto's own server (moto.server.main) on the port.

Facts about moto that shaped this (/tmp/moto-notes.md has the commands):
  * moto verifies neither Content-MD5 nor x-amz-checksum-*: compare content.
  * every GET (even a Range GET) loads the whole object into moto's memory:
    check a big object with one streamed GET (sha256_object).
  * moto's CompleteMultipartUpload keeps ~3 copies of the object in memory
    (~18 GiB for 5 GiB: OOM on a 24 GiB machine): the server here assembles
    it in a temporary file instead (_lean_multipart; ACKPT_TEST_MOTO_LEAN=0
    turns that off).
  * bucket names need >= 3 characters.
"""
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REGION = "us-east-1"
NOAUTH_KEY = ("testing", "testing")   # any key works while auth is off
AUTH_USER = "ackpt-test"
AUTH_ROLE = "ackpt-test-role"
ACCOUNT = "123456789012"   # moto's default account
# a fixed key in auth mode, so a restarted server accepts the same credentials
AUTH_KEY = ("AKIAACKPTTEST0000001", "ackptTestSecretKey0000000000000000000001")


def _venv_python():
    p = HERE.parent / ".venv" / "bin" / "python"
    return str(p) if p.exists() else sys.executable


PY = _venv_python()
_probe_cache = {}


def moto_problem():
    """None when moto's server and boto3 can be used, else why not."""
    if "why" not in _probe_cache:
        why = None
        try:
            import boto3  # noqa: F401
            import botocore  # noqa: F401
        except ImportError as e:
            why = "boto3 is not importable in %s (%s)" % (sys.executable, e)
        if why is None:
            r = subprocess.run([PY, "-c", "import moto, moto.server, boto3, werkzeug; print(moto.__version__)"],
                               capture_output=True, text=True)
            if r.returncode != 0:
                why = ("moto[server] is not importable in %s (pip install 'moto[server]' boto3): %s"
                       % (PY, (r.stderr.strip().splitlines() or ["?"])[-1]))
            else:
                _probe_cache["version"] = r.stdout.strip()
        _probe_cache["why"] = why
    return _probe_cache["why"]


def need_moto():
    why = moto_problem()
    if why:
        pytest.skip(why)


def free_loopback_port():
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


def _die_with_parent():
    """In the server's child: SIGKILL it when the test process dies (a
    killed pytest leaves no server behind)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 -- best effort
        pass


def _http_answers(port, timeout=1.0):
    """True when something on the port answers an HTTP request with a status line."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"GET /moto-api/data.json HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            return s.recv(16).startswith(b"HTTP/")
    except OSError:
        return False


class MotoServer:
    """One moto server.  workdir: where its log and state files go."""

    def __init__(self, workdir, auth=False, port=None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.auth = auth
        self.port = port or free_loopback_port()
        self.log_path = self.workdir / ("moto-%d.log" % self.port)
        self.state_path = self.workdir / ("moto-%d.state.json" % self.port)
        self.proc = None
        self.buckets = []
        self.key_id, self.secret = AUTH_KEY if auth else NOAUTH_KEY
        self.starts = 0
        self._client = None

    # ---------------------------------------------------------------- process

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def start(self, buckets=(), timeout=60.0):
        """Start the server with these buckets (plus those made before, on a
        restart) already in it; return once it answers."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        for b in buckets:
            if b not in self.buckets:
                self.buckets.append(b)
        try:
            self.state_path.unlink()
        except FileNotFoundError:
            pass
        argv = [PY, str(Path(__file__).resolve()), "serve", "--port", str(self.port),
                "--state", str(self.state_path)]
        for b in self.buckets:
            argv += ["--bucket", b]
        if self.auth:
            argv += ["--auth", "--key-id", self.key_id, "--secret", self.secret]
        env = {k: v for k, v in os.environ.items()
               if k != "LD_PRELOAD" and not k.startswith("ACKPT_") and not k.startswith("AWS_")}
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONWARNINGS"] = "ignore"
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(b"==== s3util: start #%d on port %d (auth=%d) at %.3f ====\n"
                      % (self.starts, self.port, int(self.auth), time.time()))
            log.flush()
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail("moto server exited with status %s while starting:\n%s"
                            % (self.proc.returncode, self.log_tail()), pytrace=False)
            if self.state_path.exists() and _http_answers(self.port):
                break
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail("moto server did not answer on port %d within %.0fs:\n%s"
                            % (self.port, timeout, self.log_tail()), pytrace=False)
            time.sleep(0.05)
        st = json.loads(self.state_path.read_text())
        if self.auth:
            self.key_id, self.secret = st["key_id"], st["secret"]
        self._client = None
        return self

    def kill(self):
        """SIGKILL the server (what a crash looks like to a client)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self._client = None

    def restart(self, recreate=True, timeout=60.0):
        """kill(), then start again on the same port.  recreate: the buckets
        this object made exist again when the port opens (no window in which
        a retrying client sees NoSuchBucket); else the new server is empty."""
        self.kill()
        if not recreate:
            self.buckets = []
        return self.start(timeout=timeout)

    def stop(self):
        self.kill()

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    # ---------------------------------------------------------------- log

    def log_text(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n=4000):
        t = self.log_text()
        return t if len(t) <= n else "...[cut]...\n" + t[-n:]

    def requests_seen(self, pattern):
        """How many request lines of the log (this start only) contain pattern
        (a plain substring, e.g. 'partNumber=' or 'PUT /bkt/')."""
        text = self.log_text()
        cut = text.rfind("==== s3util: start #")
        return sum(1 for ln in text[cut:].splitlines() if '"' in ln and pattern in ln)

    def wait_requests(self, pattern, count=1, timeout=60.0):
        """Wait until `count` logged requests contain pattern; returns True, or
        False on timeout.  (werkzeug logs a request when it was answered.)"""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.requests_seen(pattern) >= count:
                return True
            time.sleep(0.02)
        return False

    # ---------------------------------------------------------------- clients

    def client(self, key_id=None, secret=None, session_token=None):
        """A boto3 S3 client (path-style, few retries).  Without arguments the
        server's own key (cached)."""
        import boto3
        from botocore.config import Config
        own = key_id is None and secret is None and session_token is None
        if own and self._client is not None:
            return self._client
        c = boto3.client("s3", endpoint_url=self.url, region_name=REGION,
                         aws_access_key_id=key_id or self.key_id,
                         aws_secret_access_key=secret or self.secret,
                         aws_session_token=session_token,
                         config=Config(s3={"addressing_style": "path"},
                                       retries={"max_attempts": 2, "mode": "standard"},
                                       connect_timeout=5, read_timeout=300,
                                       max_pool_connections=16))
        if own:
            self._client = c
        return c

    def session_credentials(self, seconds=3600):
        """(key id, secret, session token): temporary credentials of a role
        (auth mode only; moto's S3 recognises AssumeRole credentials, not
        GetSessionToken ones)."""
        assert self.auth, "temporary credentials need an auth-enforced server"
        import boto3
        sts = boto3.client("sts", endpoint_url=self.url, region_name=REGION,
                           aws_access_key_id=self.key_id, aws_secret_access_key=self.secret)
        c = sts.assume_role(RoleArn="arn:aws:iam::%s:role/%s" % (ACCOUNT, AUTH_ROLE),
                            RoleSessionName="ackpt-test", DurationSeconds=seconds)["Credentials"]
        return c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"]

    def create_bucket(self, name):
        self.client().create_bucket(Bucket=name)
        if name not in self.buckets:
            self.buckets.append(name)
        return name

    def delete_bucket_contents(self, name):
        c = self.client()
        for k in self.list_objects(name):
            c.delete_object(Bucket=name, Key=k)

    def env(self, **extra):
        """AWS_* for a program that uploads here: this server's key, the
        endpoint, the region; the user's ~/.aws files and profile are kept out
        (AWS_SHARED_CREDENTIALS_FILE/AWS_CONFIG_FILE name absent files).  extra
        values of None remove the variable."""
        env = {
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.url,
            "AWS_SHARED_CREDENTIALS_FILE": str(self.workdir / "no-aws-credentials"),
            "AWS_CONFIG_FILE": str(self.workdir / "no-aws-config"),
            "AWS_SESSION_TOKEN": None,
            "AWS_PROFILE": None,
            "AWS_DEFAULT_PROFILE": None,
            "AWS_ENDPOINT_URL_S3": None,
            "AWS_EC2_METADATA_DISABLED": "true",
            "MSC_CONFIG": None,
        }
        env.update(extra)
        return env

    # ---------------------------------------------------------------- reading

    def list_objects(self, bucket, prefix=""):
        """{key: size} of every object under prefix."""
        out = {}
        pag = self.client().get_paginator("list_objects_v2")
        for page in pag.paginate(Bucket=bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                out[o["Key"]] = o["Size"]
        return out

    def get(self, bucket, key):
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def head(self, bucket, key):
        return self.client().head_object(Bucket=bucket, Key=key)

    def sha256_object(self, bucket, key, chunk=8 << 20):
        """(sha256 hex, size) of an object, streamed (one GET)."""
        h = hashlib.sha256()
        n = 0
        body = self.client().get_object(Bucket=bucket, Key=key)["Body"]
        for c in body.iter_chunks(chunk):
            h.update(c)
            n += len(c)
        return h.hexdigest(), n


def sha256_file(path, chunk=8 << 20):
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest(), n
            h.update(b)
            n += len(b)


def local_files(root):
    """{path relative to root (with '/'): size} of the regular files under root."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[p.relative_to(root).as_posix()] = p.stat().st_size
    return out


def compare_with_bucket(server, bucket, prefix, root, only=None, big=64 << 20):
    """Differences (list of strings) between the files under root and the
    objects under prefix/: names, sizes, bytes (sha256 for files > big).
    only: a predicate on the relative path restricting what is compared."""
    root = Path(root)
    pre = prefix.strip("/")
    pre = pre + "/" if pre else ""
    loc = {k: v for k, v in local_files(root).items() if only is None or only(k)}
    rem = {k[len(pre):]: v for k, v in server.list_objects(bucket, pre).items()}
    rem = {k: v for k, v in rem.items() if only is None or only(k)}
    diffs = []
    missing = sorted(set(loc) - set(rem))
    extra = sorted(set(rem) - set(loc))
    if missing:
        diffs.append("not uploaded: %s" % ", ".join(missing))
    if extra:
        diffs.append("objects without a local file: %s" % ", ".join(extra))
    for rel in sorted(set(loc) & set(rem)):
        if loc[rel] != rem[rel]:
            diffs.append("%s: local %d bytes, object %d bytes" % (rel, loc[rel], rem[rel]))
            continue
        if loc[rel] > big:
            a, _ = sha256_file(root / rel)
            b, _ = server.sha256_object(bucket, pre + rel)
            if a != b:
                diffs.append("%s: contents differ (sha256 %s local, %s object)" % (rel, a, b))
        else:
            data = server.get(bucket, pre + rel)
            local = (root / rel).read_bytes()
            if data != local:
                off = next((i for i in range(min(len(data), len(local))) if data[i] != local[i]),
                           min(len(data), len(local)))
                diffs.append("%s: contents differ (size %d), first differing byte at %d"
                             % (rel, len(local), off))
    return diffs


# --------------------------------------------------------------------------
# The server process
# --------------------------------------------------------------------------

def _serve(argv):
    import argparse
    ap = argparse.ArgumentParser(prog="s3util.py serve")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--state", required=True)
    ap.add_argument("--bucket", action="append", default=[])
    ap.add_argument("--auth", action="store_true")
    ap.add_argument("--key-id")
    ap.add_argument("--secret")
    a = ap.parse_args(argv)

    import boto3
    from moto import mock_aws, settings
    from moto.core.authorization import ActionAuthenticatorMixin

    # Prepare the in-memory backends through moto's in-process mock; the
    # server below serves the same backends.
    mock = mock_aws()
    mock.start()
    kw = dict(region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing")
    s3 = boto3.client("s3", **kw)
    for b in a.bucket:
        s3.create_bucket(Bucket=b)
    state = {"port": a.port, "buckets": a.bucket, "auth": a.auth}
    if a.auth:
        iam = boto3.client("iam", **kw)
        iam.create_user(UserName=AUTH_USER)
        iam.put_user_policy(UserName=AUTH_USER, PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Action": ["s3:*", "sts:*"], "Resource": "*"}]}))
        k = iam.create_access_key(UserName=AUTH_USER)["AccessKey"]
        key_id, secret = k["AccessKeyId"], k["SecretAccessKey"]
        if a.key_id and a.secret:
            try:
                key_id, secret = _rekey(key_id, a.key_id, a.secret)
            except Exception as e:  # moto internals moved: keep the random key
                print("s3util: cannot fix the access key (%r); using %s" % (e, key_id), flush=True)
        # a role the user may assume: temporary credentials (AWS_SESSION_TOKEN)
        iam.create_role(RoleName=AUTH_ROLE, AssumeRolePolicyDocument=json.dumps(
            {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}]}))
        iam.put_role_policy(RoleName=AUTH_ROLE, PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        state.update(key_id=key_id, secret=secret,
                     role_arn="arn:aws:iam::%s:role/%s" % (ACCOUNT, AUTH_ROLE))
        # from now on every request is authenticated (signature + policy)
        settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    ActionAuthenticatorMixin.request_count = 0
    tmp = a.state + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.rename(tmp, a.state)
    print("s3util: prepared %s" % json.dumps(state), flush=True)

    if os.environ.get("ACKPT_TEST_MOTO_LEAN", "1") != "0":
        _lean_multipart()
    from moto.server import main
    main(["-H", "127.0.0.1", "-p", str(a.port)])


def _lean_multipart():
    """Make moto's CompleteMultipartUpload assemble the object in a temporary
    file instead of memory.

    moto 5 concatenates every part in a bytearray, copies it to bytes, and
    (with no checksum algorithm asked for) also keeps a second bytearray of
    the whole object for a CRC64NVME it computes at the end: ~18 GiB of RSS
    for a 5 GiB object, which gets it OOM-killed on a 24 GiB machine.  Here
    the parts are copied into a temporary file that becomes the object's
    buffer, and the full-object checksum nobody asked for is skipped
    (composite checksums a client asks for are still computed; a requested
    full-object checksum uses moto's own code).  Validation (InvalidPart,
    EntityTooSmall, MalformedXML) and the ETag are moto's.  Set
    ACKPT_TEST_MOTO_LEAN=0 to run moto unpatched."""
    import codecs
    import tempfile
    try:
        from moto.s3 import models as m
        cls, key_cls = m.FakeMultipart, m.FakeKey
        InvalidPart, EntityTooSmall, MalformedXML = m.InvalidPart, m.EntityTooSmall, m.MalformedXML
        Builder, md5_hash = m.MultipartChecksumBuilder, m.md5_hash
        min_size = m.S3_UPLOAD_PART_MIN_SIZE
        orig_complete = cls.complete
        prop = key_cls.value
        orig_set = prop.fset
    except Exception as e:  # noqa: BLE001 -- another moto: leave it alone
        print("s3util: moto left unpatched (%r)" % (e,), flush=True)
        return

    class FileValue:
        def __init__(self, f, n):
            self.f, self.n = f, n

        def __len__(self):
            return self.n

    def complete(self, body):
        algo = self.metadata.get("x-amz-checksum-algorithm")
        builder = Builder(algo, self.metadata.get("x-amz-checksum-type")) if algo else None
        if builder is not None and builder.checksum_type != "COMPOSITE":
            return orig_complete(self, body)
        decode_hex = codecs.getdecoder("hex_codec")
        total = tempfile.TemporaryFile()
        md5s = bytearray()
        last, count, size = None, 0, 0
        try:
            for pn, etag in body:
                part = self.parts.get(pn)
                part_etag = None
                if part is not None:
                    part_etag = part.etag.replace('"', "")
                    etag = etag.replace('"', "")
                if part is None or part_etag != etag:
                    raise InvalidPart()
                if last is not None and last.contentsize < min_size:
                    raise EntityTooSmall()
                md5s.extend(decode_hex(part_etag)[0])
                v = part.value
                total.write(v)
                size += len(v)
                if builder is not None:
                    builder.addPart(v)
                last = part
                count += 1
            if count == 0:
                raise MalformedXML
        except BaseException:
            total.close()
            raise
        full = md5_hash()
        full.update(bytes(md5s))
        return (FileValue(total, size), "%s-%d" % (full.hexdigest(), count),
                builder.build() if builder is not None else None)

    def set_value(self, new_value):
        if isinstance(new_value, FileValue):
            # (FakeKey.__init__ sets the value before it makes self.lock)
            old, self._value_buffer = self._value_buffer, new_value.f
            old.close()
            self.contentsize = new_value.n
            return
        orig_set(self, new_value)

    cls.complete = complete
    key_cls.value = property(prop.fget, set_value, prop.fdel, prop.__doc__)
    print("s3util: moto's CompleteMultipartUpload assembles objects in a temporary file", flush=True)


def _rekey(old_id, new_id, new_secret):
    """Give the IAM access key old_id the id and secret new_id/new_secret."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.iam.models import iam_backends
    backend = iam_backends[DEFAULT_ACCOUNT_ID]["aws"]
    user = backend.get_user(AUTH_USER)
    key = next(k for k in user.access_keys if k.access_key_id == old_id)
    key.access_key_id = new_id
    key.secret_access_key = new_secret
    index = getattr(backend, "access_keys", None)
    if isinstance(index, dict):
        for k in [k for k, v in index.items() if v is key]:
            del index[k]
        index[getattr(key, "physical_resource_id", new_id)] = key
    return new_id, new_secret


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "serve":
        _serve(sys.argv[2:])
    else:
        sys.exit("usage: s3util.py serve --port P --state FILE [--bucket B]... [--auth]")
