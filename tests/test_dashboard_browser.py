"""The dashboard in a real headless Chromium, driven over the WebDriver HTTP protocol with urllib.

A real `serve` with the dashboard on runs real workflows; the test opens the page and checks what a
person would see: the run in the list, its timeline bars, a live status change while it runs, an
action refused with a wrong token and applied with the right one. A screenshot of the run page is
saved (TYOW_SCREENSHOT=path keeps it). Needs Debian's chromium and chromium-driver (`.ci/run`
installs them); skipped, saying so, where they are not installed.
"""
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import unittest
import urllib.error
import urllib.request

from tests.util import MODULE, TempHome, tow, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"

WF = """
async function workflow(input, { step, sleep, waitForSignal }) {
  const order = await step("load-order", () => ({ id: input.order, items: 3 }));
  await sleep("cool-down", 1200);
  const paid = await waitForSignal("payment", { timeout: "10m" });
  const label = await step("print-label", () => "label-" + order.id);
  return { order, paid, label };
}
"""


MANY = """
async function workflow(input, { step }) {
  for (let i = 0; i < 50; i++) await step("step-" + i, () => i);
  if (input.fail) await step("explode", () => { throw new Error("it broke"); },
    { retry: { maxAttempts: 2, initialInterval: "100ms" } });
  return "fifty";
}
"""
DATE = r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebDriver:
    """The few WebDriver commands the test needs, over HTTP to a local chromedriver."""

    def __init__(self, tmp):
        self.port = free_port()
        self.proc = subprocess.Popen([DRIVER, "--port=%d" % self.port], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_for(self._up, timeout=20, what="chromedriver to answer")
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", "--window-size=1280,900",
                     "--user-data-dir=" + os.path.join(tmp, "chromium-profile")]}}}}
        self.session = self.call("POST", "/session", caps)["sessionId"]

    def _up(self):
        try:
            return json.loads(urllib.request.urlopen("http://127.0.0.1:%d/status" % self.port, timeout=2).read())
        except (OSError, ValueError):
            return None

    def call(self, method, path, body=None):
        req = urllib.request.Request("http://127.0.0.1:%d%s" % (self.port, path), method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            doc = json.loads(urllib.request.urlopen(req, timeout=60).read())
        except urllib.error.HTTPError as exc:
            raise AssertionError("webdriver %s %s: %s" % (method, path, exc.read()[:500]))
        return doc.get("value", doc) if path != "/session" else doc["value"]

    def s(self, method, path, body=None):
        return self.call(method, "/session/%s%s" % (self.session, path), body)

    def go(self, url):
        self.s("POST", "/url", {"url": url})

    def js(self, script, *args):
        return self.s("POST", "/execute/sync", {"script": script, "args": list(args)})

    def find(self, css):
        found = self.s("POST", "/elements", {"using": "css selector", "value": css})
        return [f[ELEMENT] for f in found]

    def click(self, css):
        """Click it as a person would; the page re-renders every 2 s, so a found element may go stale."""
        for attempt in range(10):
            wait_for(lambda: self.find(css), timeout=15, what=css)
            try:
                self.s("POST", "/element/%s/click" % self.find(css)[0], {})
                return
            except AssertionError:
                if attempt == 9:
                    raise
                time.sleep(0.2)

    def text(self, css="body"):
        try:
            els = self.find(css)
            return self.s("GET", "/element/%s/text" % els[0]) if els else ""
        except AssertionError:  # replaced by a re-render between the two calls
            return ""

    def size(self, width, height):
        self.s("POST", "/window/rect", {"width": width, "height": height})

    def screenshot(self, path):
        with open(path, "wb") as f:
            f.write(base64.b64decode(self.s("GET", "/screenshot")))

    def quit(self):
        try:
            self.call("DELETE", "/session/%s" % self.session)
        finally:
            self.proc.kill()
            self.proc.wait()


@unittest.skipUnless(CHROMIUM and DRIVER, "chromium and chromedriver are not installed (Debian: apt-get install "
                                          "chromium chromium-driver; .ci/run does)")
class InABrowser(TempHome):
    def setUp(self):
        super().setUp()
        self.port = free_port()
        self.write_config(extra="dashboard:\n  enabled: true\n  host: 127.0.0.1\n  port: %d\n" % self.port)
        self.sc = self.sidecar(clock=False)
        self.sc.deploy("orders", WF)
        self.serve = subprocess.Popen([sys.executable, MODULE, "--config", self.config_path, "serve"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.addCleanup(self._stop_serve)
        wait_for(lambda: self._get("/healthz"), timeout=20, what="the dashboard to answer")
        self.browser = WebDriver(self.tmp)
        self.addCleanup(self.browser.quit)

    def _stop_serve(self):
        self.serve.terminate()
        self.serve.wait(20)

    def _get(self, path):
        try:
            return urllib.request.urlopen("http://127.0.0.1:%d%s" % (self.port, path), timeout=2).read()
        except OSError:
            return None

    def shown(self, run_id):
        """The status the open run page shows for ``run_id`` (None while another page is shown)."""
        return self.browser.js("const h = document.querySelector('main .row b'); const s = document.querySelector("
                               "'main .row .st'); return h && s && h.textContent === arguments[0] ? s.textContent "
                               ": null", run_id)

    def test_what_a_person_sees_and_does(self):
        b = self.browser
        run_id = self.sc.start("orders", {"order": 42})["id"]
        other = self.sc.start("orders", {"order": 7})["id"]
        b.go("http://127.0.0.1:%d/" % self.port)
        wait_for(lambda: run_id in b.text("#runs"), timeout=15, what="the run in the list")
        b.click('tr.run[data-id="%s"]' % run_id)
        wait_for(lambda: self.shown(run_id) == "waiting", timeout=20, what="the run to wait for its payment")
        bars = b.js("return [...document.querySelectorAll('#timeline .bar')].map(e => e.dataset.step)"
                    ".filter(Boolean)")
        for step in ("load-order", "cool-down", "signal:payment"):
            self.assertIn(step, bars)
        widths = b.js("return [...document.querySelectorAll('#timeline .bar[data-step]')]"
                      ".map(e => e.getBoundingClientRect().width)")
        self.assertTrue(all(w >= 3 for w in widths), widths)
        # A live change: the signal arrives from the CLI; the open page follows without a reload.
        subprocess.run([sys.executable, MODULE, "--config", self.config_path, "signal", run_id, "payment",
                        "-d", '{"amount": 12}'], check=True, capture_output=True)
        wait_for(lambda: self.shown(run_id) == "completed" and "label-42" in b.text("#output"), timeout=20,
                 what="the page to show the run completed")
        shot = os.environ.get("TYOW_SCREENSHOT") or os.path.join(self.tmp, "run-page.png")
        b.screenshot(shot)
        self.assertGreater(os.path.getsize(shot), 10000)
        # An action: refused with a wrong token, applied with the right one.
        b.click("#back")
        b.click('tr.run[data-id="%s"]' % other)
        wait_for(lambda: self.shown(other) == "waiting", timeout=20, what="the other run to wait")
        b.js("localStorage.setItem('tyow-token', 'not-the-token')")
        b.click("#do-cancel")
        wait_for(lambda: "refused" in b.text("#action-result"), timeout=10, what="the cancel to be refused")
        self.assertEqual(self.sc.status(other)["status"], "waiting")
        token = tow.install_secret(self.data_dir, tow.DASHBOARD_TOKEN_FILE).decode().strip()
        b.js("localStorage.setItem('tyow-token', arguments[0])", token)
        b.click("#do-cancel")
        wait_for(lambda: self.sc.status(other)["status"] == "canceled", timeout=10, what="the cancel to apply")
        wait_for(lambda: self.shown(other) == "canceled", timeout=10, what="the page to show it")


    def test_a_run_at_a_glance_at_a_small_and_a_large_window(self):
        b = self.browser
        self.sc.deploy("many", MANY)
        ok = self.sc.start("many", {})["id"]
        bad = self.sc.start("many", {"fail": True})["id"]
        wait_for(lambda: self.sc.status(bad)["status"] == "failed"
                 and self.sc.status(ok)["status"] == "completed", timeout=60, what="both runs")
        base = "http://127.0.0.1:%d/" % self.port
        for width, height in ((390, 800), (1400, 900)):
            b.size(width, height)
            b.go(base)
            wait_for(lambda: ok in b.text("#runs"), timeout=15, what="the runs list")
            b.click('tr.run[data-id="%s"] a' % bad)  # each run has an address of its own
            wait_for(lambda: self.shown(bad) == "failed", timeout=15, what="the failed run's page")
            self.assertEqual(b.js("return location.hash"), "#/runs/" + bad)
            page = b.js("""return {overflow: document.documentElement.scrollWidth - innerWidth,
                ticks: [...document.querySelectorAll('#axis .tick')].map(e => e.textContent),
                shownTicks: [...document.querySelectorAll('#axis .tick')].filter(e => e.offsetWidth)
                    .map(e => e.getBoundingClientRect()),
                bars: document.querySelectorAll('#timeline .bar[data-step]').length,
                durs: [...document.querySelectorAll('#timeline .dur')].map(e => e.textContent),
                cancel: !!document.querySelector('#do-cancel'),
                retry: !!document.querySelector('#do-retry'),
                signal: !!document.querySelector('#do-signal'),
                attempts: (document.querySelector('#failed-attempts') || {}).textContent || '',
                lastPass: (document.querySelector('#last-pass') || {}).textContent || ''}""")
            wide = b.js("""return [...document.querySelectorAll('body *')].filter(e =>
                e.getBoundingClientRect().right > innerWidth + 1).slice(0, 5).map(e =>
                e.tagName + '.' + e.className + '#' + e.id + ' ' + Math.round(e.getBoundingClientRect().right))""")
            self.assertLessEqual(page["overflow"], 0, "the page scrolls sideways at %d px: %s"
                                 % (width, wide))
            self.assertEqual(len(page["ticks"]), 5, page["ticks"])
            self.assertRegex(page["ticks"][0], r"^\d{2}:\d{2}:\d{2}$")  # the date is its title
            self.assertTrue(all(t.startswith("+") for t in page["ticks"][1:]), page["ticks"])
            shown = page["shownTicks"]
            self.assertTrue(all(a["right"] <= b2["left"] for a, b2 in zip(shown, shown[1:])),
                            "time labels overlap at %d px: %s" % (width, shown))
            self.assertEqual(page["bars"], 51)
            self.assertEqual(len(page["durs"]), 51)
            self.assertEqual((page["cancel"], page["retry"], page["signal"]), (False, True, False))
            self.assertIn("2", page["attempts"])
            self.assertIn("failed", page["lastPass"])
            b.screenshot(os.path.join(self.tmp, "failed-%d.png" % width))
            if os.environ.get("TYOW_SCREENSHOT_DIR"):
                b.screenshot(os.path.join(os.environ["TYOW_SCREENSHOT_DIR"], "failed-%d.png" % width))
            b.js("history.back()")
            wait_for(lambda: b.js("return location.hash") in ("", "#/runs") and ok in b.text("#runs"),
                     timeout=15, what="back to the list")
            b.go(base + "#/runs/" + ok)  # a shared link opens the run
            wait_for(lambda: self.shown(ok) == "completed", timeout=15, what="the completed run")
            shown = b.js("""return {cancel: !!document.querySelector('#do-cancel'),
                retry: !!document.querySelector('#do-retry'),
                dates: [...document.querySelectorAll('.grid span')].map(e => e.textContent)
                    .filter(t => /\d{4}-\d{2}|\d+\/\d+\/\d+/.test(t))}""")
            self.assertEqual((shown["cancel"], shown["retry"]), (False, False))
            self.assertTrue(shown["dates"])
            for text in shown["dates"]:
                self.assertRegex(text, DATE)
        out = subprocess.run([sys.executable, MODULE, "--config", self.config_path, "status", ok],
                             capture_output=True, text=True, check=True).stdout
        self.assertIn("dashboard http://127.0.0.1:%d/#/runs/%s" % (self.port, ok), out)


if __name__ == "__main__":
    unittest.main()
