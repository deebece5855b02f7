"""A browser app end to end: a page in Debian's headless Chromium sends a command with the
`mqtt` npm package's browser bundle over the shipped broker config's WebSocket listener, as
the app's own broker account; the agent (daemon subprocess) takes it from its command topic
and the API stand-in receives the event with that app's identity (its application_id and its
cookie); the reply comes back to the page on the app's reply topic.

The page is the one docs/apps.md shows ("Browser apps"), plus a POST of the reply back to the
test's HTTP server. The JavaScript client is installed with npm at test time into
~/.cache/engagement-agent-test/npm (not committed); Chromium and npm are Debian packages that
.ci/run installs.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from agent_devtools.apistub import ApiStub
from tests.fixtures.api import api_project
from tests.fixtures.daemon import AgentProcess
from tests.fixtures.shipped_broker import PASSWORD, ShippedBroker, running_broker

DEVICE = "kiosk-042"
APP = "kiosk-ui"
MQTT_JS_VERSION = "5"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "engagement-agent-test"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
]

PAGE = """<!doctype html>
<html>
<head><meta charset="utf-8"><title>kiosk</title><script src="mqtt.min.js"></script></head>
<body>
<pre id="reply">connecting</pre>
<script>
// The app's account on the device's broker (deploy/mosquitto/add-app kiosk-ui).
const device = "kiosk-042", app = "kiosk-ui";
const base = `engagement/${device}/${app}`;
const client = mqtt.connect("ws://127.0.0.1:WS_PORT", {
  username: app, password: "PASSWORD", protocolVersion: 5, clientId: `${app}-page`,
});
client.on("connect", () => {
  client.subscribe(`${base}/reply`, { qos: 1 }, () => {
    client.publish(`${base}/command`, JSON.stringify({
      command: "track_event", name: "page_view", request_id: "view-1",
      properties: { page: "home" },
    }), { qos: 1 });
  });
});
client.on("message", (topic, payload) => {
  document.getElementById("reply").textContent = payload.toString();
  fetch("/report", { method: "POST", body: payload.toString() });  // for the test only
});
client.on("error", (err) => fetch("/report", { method: "POST", body: "error: " + err }));
</script>
</body>
</html>
"""


def mqtt_bundle() -> Path:
    """The `mqtt` package's browser bundle, from the npm registry once, then from the cache."""
    prefix = CACHE / "npm"
    bundle = prefix / "node_modules/mqtt/dist/mqtt.min.js"
    if not bundle.exists():
        npm = shutil.which("npm")
        assert npm, "npm is missing: apt-get install npm (or .ci/run)"
        prefix.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                npm,
                "install",
                "--prefix",
                str(prefix),
                "--no-audit",
                "--no-fund",
                f"mqtt@{MQTT_JS_VERSION}",
            ],
            check=True,
            capture_output=True,
            timeout=600,
        )
    assert bundle.exists(), bundle
    return bundle


class PageServer:
    """Serves the page and its script, and collects what the page POSTs to /report."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.reports: queue.Queue[str] = queue.Queue()
        reports, served = self.reports, files

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = served.get(self.path.split("?")[0])
                if body is None:
                    self.send_error(404)
                    return
                kind = "text/html" if self.path.endswith((".html", "/")) else "text/javascript"
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                reports.put(self.rfile.read(length).decode())
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[ShippedBroker]:
    with running_broker(tmp_path, ("_agent", APP, "pos")) as started:
        yield started


def test_page_in_chromium_reaches_the_api_as_its_app(
    tmp_path: Path,
    broker: ShippedBroker,
    api_stub: ApiStub,
    make_agent: Callable[..., AgentProcess],
) -> None:
    chromium = shutil.which("chromium")
    assert chromium, "chromium is missing: apt-get install chromium (or .ci/run)"
    agent = make_agent(
        {
            "device_id": DEVICE,
            "project": api_project(api_stub),
            "apps": {
                "allow_unknown": False,
                APP: {"application_id": "kiosk-ui-app"},
                "pos": {"application_id": "pos-app"},
            },
            "mqtt": {
                "enabled": True,
                "host": "127.0.0.1",
                "port": broker.port,
                "username": "_agent",
                "password": PASSWORD,
                "topic_prefix": "engagement",
            },
        }
    )
    agent.start()
    # The app's cookie, asked over the socket: the page's event must carry this one.
    cookie = agent.request({"command": "get_customer", "app": APP})["result"]["ids"]["cookie"]
    other = agent.request({"command": "get_customer", "app": "pos"})["result"]["ids"]["cookie"]
    assert cookie != other

    page = PAGE.replace("WS_PORT", str(broker.ws_port)).replace("PASSWORD", PASSWORD)
    server = PageServer({"/index.html": page.encode(), "/mqtt.min.js": mqtt_bundle().read_bytes()})
    browser = subprocess.Popen(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'chromium'}",
            f"{server.url}/index.html",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        report = server.reports.get(timeout=120)
        reply = json.loads(report)
        assert reply["ok"] is True and reply["request_id"] == "view-1", report
        assert api_stub.wait_for(
            lambda: any(r.data.get("event_type") == "page_view" for r in api_stub.received()), 60
        ), agent.log()
    finally:
        browser.kill()
        browser.wait(30)
        server.close()
    event = next(r.data for r in api_stub.received() if r.data.get("event_type") == "page_view")
    assert event["properties"]["application_id"] == "kiosk-ui-app"
    assert event["properties"]["page"] == "home"
    assert event["customer_ids"]["cookie"] == cookie
