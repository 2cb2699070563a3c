"""Demo app behind an Envoy: answers who called it, from the header Envoy sets after mTLS."""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        caller = self.headers.get("x-forwarded-client-cert", "")
        uri = next((part[4:] for part in caller.split(";") if part.startswith("URI=")), "(no client certificate)")
        body = f"hello from {sys.argv[2]}; caller identity: {uri}"
        # Set by an Envoy that checked a bearer JWT (jwt_authn's claim_to_headers).
        for header in ("x-jwt-sub", "x-jwt-exp"):
            if header in self.headers:
                body += f"; {header}: {self.headers[header]}"
        body = (body + "\n").encode()
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
