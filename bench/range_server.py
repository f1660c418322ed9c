"""A threaded HTTP server with range support for the remote benchmark:
    python bench/range_server.py DIR PORT
Serves the files of DIR (GET, `Range: bytes=A-B`, ETag from size and mtime) with sendfile."""

import http.server
import os
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_GET(self):
        path = os.path.join(DIR, os.path.basename(self.path.split("?")[0]))
        if not os.path.isfile(path):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        st = os.stat(path)
        a, b = 0, st.st_size - 1
        rng = self.headers.get("Range")
        if rng:
            x, y = rng.split("=")[1].split("-")
            a, b = int(x), min(int(y), st.st_size - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {a}-{b}/{st.st_size}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(b - a + 1))
        self.send_header("ETag", f'"{st.st_size}-{st.st_mtime_ns}"')
        self.end_headers()
        with open(path, "rb") as f:
            self.wfile.flush()
            self.connection.sendfile(f, a, b - a + 1)


if __name__ == "__main__":
    DIR = sys.argv[1]
    s = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), Handler)
    s.daemon_threads = True
    s.serve_forever()
