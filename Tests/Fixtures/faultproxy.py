#!/usr/bin/python3
"""Fault-injecting HTTP proxy for the erofs-compat test suite.

usage: faultproxy.py PORT UPSTREAM CONTROL_FILE

Forwards every request to UPSTREAM (http://127.0.0.1:N) and, as the JSON in CONTROL_FILE says
(re-read on every request), injects faults into requests whose path contains "match":

  {"fault": "status", "status": 503, "every": 3}   every 3rd matching request answers 503
  {"fault": "reset", "every": 2}                     ... the connection is reset (RST) instead
  {"fault": "stall", "seconds": 2, "every": 2}       ... the response is delayed
  {"fault": "truncate", "every": 2}                  ... half the body arrives, then the connection closes
  {"fault": "status", "status": 503, "every": 1}     always (a server that is down for reads)
  {"fault": "shiftrange", "shift": 4096}             ... a 206 for the range "shift" bytes later, labelled so
  {"fault": "trickle", "seconds": 0.5}               ... headers, then one body byte every "seconds"
  {"fault": "hugetotal"}                             ... Content-Range total 2^64-1 (above Int64.max)
  {"fault": "norange", "length": 1099511627776}      ... 200 without Range support; HEAD claims "length"
  {"fault": "flip", "at": 123456}                    ... the byte at blob offset "at" inverted in every body holding it

"every" counts matching requests (default 1 = all); "after" exempts the first N matching
requests; "match" defaults to "" (all paths).
With {"bearer": {"user": U, "password": P}} the proxy also acts as a token-auth front: requests
under /v2/ need "Authorization: Bearer <token>", 401 answers carry a Bearer challenge whose realm
is this proxy's /token ("realm" overrides it), and /token hands out tokens for Basic U:P (or anonymously when "user" is
null). With {"referrers": true} it adds the OCI 1.1 referrers API to a registry without it: a manifest PUT whose
body has a "subject" is answered with an OCI-Subject header once the registry stored it, and
GET /v2/NAME/referrers/DIGEST lists those manifests (?artifactType= filters). PUT, POST and PATCH are forwarded with
their bodies. Statistics are appended to CONTROL_FILE + ".log" (one line per request).
"""
import base64, http.client, http.server, json, os, secrets, socket, socketserver, struct, sys, threading, time
import urllib.parse

PORT, UPSTREAM, CONTROL = int(sys.argv[1]), sys.argv[2], sys.argv[3]
UP_HOST, UP_PORT = UPSTREAM.split("//", 1)[1].rstrip("/").split(":")
lock = threading.Lock()
counter = {"n": 0}
tokens = set()
referrers = {}  # (repository, subject digest) -> [descriptor]


def control():
    try:
        with open(CONTROL) as f:
            return json.load(f)
    except Exception:
        return {}


def log(line):
    with lock, open(CONTROL + ".log", "a") as f:
        f.write(line + "\n")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reset(self):
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def do_HEAD(self):
        self.handle_any(head=True)

    def do_GET(self):
        if control().get("referrers") and "/referrers/" in self.path:
            return self.list_referrers()
        self.handle_any(head=False)

    def do_PUT(self):
        self.forward_body("PUT")

    def do_POST(self):
        self.forward_body("POST")

    def do_PATCH(self):
        self.forward_body("PATCH")

    def forward_body(self, method):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        got = self.upstream(method, headers, body)
        if got is None:
            return self.reset()
        r, answer, out = got
        log("pass %s %s" % (method, self.path))
        if method == "PUT" and "/manifests/" in self.path and r.status == 201 and control().get("referrers"):
            self.index_referrer(body, out)
        self.reply(r.status, answer, out)

    def index_referrer(self, body, out):
        try:
            manifest = json.loads(body)
        except ValueError:
            return
        subject = manifest.get("subject", {}).get("digest")
        if not subject:
            return
        repo = self.path[4:].split("/manifests/")[0]
        entry = {"mediaType": manifest.get("mediaType", self.headers.get("Content-Type", "")),
                 "digest": out.get("Docker-Content-Digest", ""), "size": len(body),
                 "artifactType": manifest.get("artifactType") or manifest.get("config", {}).get("mediaType", "")}
        if manifest.get("annotations"):
            entry["annotations"] = manifest["annotations"]
        with lock:
            referrers.setdefault((repo, subject), []).append(entry)
        out["OCI-Subject"] = subject

    def list_referrers(self):
        path, _, query = self.path.partition("?")
        repo, _, subject = path[4:].partition("/referrers/")
        with lock:
            found = list(referrers.get((repo, subject), []))
        if query.startswith("artifactType="):
            want = urllib.parse.unquote(query.split("=", 1)[1])
            found = [d for d in found if d["artifactType"] == want]
        log("referrers %s %d" % (self.path, len(found)))
        body = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                           "manifests": found}).encode()
        self.reply(200, body, {"Content-Type": "application/vnd.oci.image.index.v1+json"})

    def handle_any(self, head):
        c = control()
        bearer = c.get("bearer")
        if bearer is not None and self.path.startswith("/token"):
            return self.issue_token(bearer)
        if bearer is not None and self.path.startswith("/v2/"):
            auth = self.headers.get("Authorization", "")
            if not (auth.startswith("Bearer ") and auth[7:] in tokens):
                repo = self.path[4:].split("/manifests/")[0].split("/blobs/")[0]
                realm = c.get("realm", "http://127.0.0.1:%d/token" % PORT)
                challenge = ('Bearer realm="%s",service="faultproxy",scope="repository:%s:pull"' % (realm, repo))
                log("401 %s" % self.path)
                return self.reply(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {"WWW-Authenticate": challenge, "Content-Type": "application/json"})
        fault = None
        if c.get("fault") and c.get("match", "") in self.path:
            with lock:
                counter["n"] += 1
                n = counter["n"]
            if n > int(c.get("after", 0)) and n % max(int(c.get("every", 1)), 1) == 0:
                fault = c["fault"]
        log("%s %s %s" % (fault or "pass", self.path, self.headers.get("Range", "")))
        if fault == "status":
            return self.reply(int(c.get("status", 503)), b"injected\n", {"Content-Type": "text/plain"})
        if fault == "reset":
            return self.reset()
        if fault == "stall":
            time.sleep(float(c.get("seconds", 2)))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection", "authorization")}
        if fault == "shiftrange" and headers.get("Range", "").startswith("bytes="):
            a, b = headers["Range"][6:].split("-")
            shift = int(c.get("shift", 4096))
            headers["Range"] = "bytes=%d-%d" % (int(a) + shift, int(b) + shift)
        if fault == "norange":
            headers.pop("Range", None)
        got = self.upstream("HEAD" if head else "GET", headers)
        if got is None:
            return self.reset()
        r, body, out = got
        if fault == "hugetotal" and "Content-Range" in out:
            out["Content-Range"] = out["Content-Range"].rsplit("/", 1)[0] + "/18446744073709551615"
        if fault == "norange":
            out.pop("Content-Range", None)
            out.pop("Accept-Ranges", None)
            if head:
                out["Content-Length"] = str(int(c.get("length", 1 << 40)))
            return self.reply(200, body, out, head=head)
        if fault == "flip" and body:
            at, start = int(c.get("at", 0)), 0
            rng = self.headers.get("Range", "")
            if rng.startswith("bytes="):
                start = int(rng[6:].split("-")[0])
            if start <= at < start + len(body):
                body = bytearray(body)
                body[at - start] ^= 0xFF
                body = bytes(body)
        if fault == "trickle":
            self.send_response(r.status)
            for k, v in out.items():
                self.send_header(k, v)
            self.end_headers()
            try:
                for i in range(len(body)):
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                    time.sleep(float(c.get("seconds", 0.5)))
            except Exception:
                pass
            return self.reset()
        if fault == "truncate" and len(body) > 1:
            self.send_response(r.status)
            for k, v in out.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            return self.reset()
        self.reply(r.status, body, out, head=head)

    def upstream(self, method, headers, body=None):
        """The request sent on to UPSTREAM: its response, body and the headers to pass back (None when
        UPSTREAM could not be asked)."""
        up = http.client.HTTPConnection(UP_HOST, int(UP_PORT), timeout=60)
        try:
            up.request(method, self.path, body=body, headers=headers)
            r = up.getresponse()
            answer = r.read()
        except Exception:
            return None
        finally:
            up.close()
        hop = ("connection", "transfer-encoding", "keep-alive")
        return r, answer, {k: v for k, v in r.getheaders() if k.lower() not in hop}

    def issue_token(self, bearer):
        want = bearer.get("user")
        if want is not None:
            expected = "Basic " + base64.b64encode(("%s:%s" % (want, bearer.get("password", ""))).encode()).decode()
            if self.headers.get("Authorization", "") != expected:
                log("token-refused %s" % self.path)
                return self.reply(401, b'{"details":"bad credentials"}', {"Content-Type": "application/json"})
        t = secrets.token_hex(16)
        tokens.add(t)
        log("token %s" % self.path)
        self.reply(200, json.dumps({"token": t, "expires_in": 300}).encode(), {"Content-Type": "application/json"})

    def reply(self, status, body, headers, head=False):
        self.send_response(status)
        for k, v in headers.items():
            if k.lower() != "content-length":
                self.send_header(k, v)
        self.send_header("Content-Length", headers.get("Content-Length", str(len(body))) if head else str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


Server(("127.0.0.1", PORT), Handler).serve_forever()
