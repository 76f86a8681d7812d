"""The web console (connector/src/console) in a real browser: headless
Chromium driven through Selenium, against the real daemon under the demo
usage policy, on a state directory of its own (no agreement, no audit record
and no privacy spending yet).

The browser signs in with one-time links that `sluice console` mints over
mTLS, approves the research institute's agreement and finds the approval in
the audit trail, and runs a differentially private query in the workbench.
Then what a browser must not manage: use a link twice or late, reach the
admin pages as a consumer, change state without the form's CSRF token, see
anything but the sign-in page without a session. `requests` reads what
Selenium cannot: status codes, headers and cookie attributes.

The browser and its driver are the system's (Debian chromium and
chromium-driver, which tests/run.sh installs); Selenium never downloads
one. Chromium trusts the console by its certificate's public key alone
(--ignore-certificate-errors-spki-list), not every certificate. Screenshots
of the key moments, and of every failure, go to $SLUICE_ARTIFACTS/console
(default tests/artifacts/console)."""

import base64
import hashlib
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlsplit

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from conftest import (DEMO_POLICY, RESEARCH_OFFER, RESEARCH_PURPOSE, ROOT, Daemon,
                      ensure_research_agreement, grpc_channel, sluice_bin, sluice_v1)

pb = sluice_v1()
TIMEOUT = 30

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = (Path(os.environ["SLUICE_ARTIFACTS"]) if os.environ.get("SLUICE_ARTIFACTS")
             else ROOT / "tests" / "artifacts") / "console"

COOKIE = "__Host-sluice-session"
REFUSED_LINK = "expired, already used or unknown"
ADMIN_PAGES = ["/admin/agreements", "/admin/audit", "/admin/budgets", "/admin/datasets"]
DP_SQL = "SELECT start_zone, count(*) AS trips FROM trips GROUP BY start_zone"


# --- the daemon, its certificate, links and principals -----------------------

@pytest.fixture(scope="module")
def console(state_dir):
    """A daemon of its own under the demo policy, serving the console, on a
    copy of the prepared state directory without its stores and audit log:
    no agreement, no audit record, no privacy spending yet."""
    work = Path(tempfile.mkdtemp(prefix="sluice-console-"))
    state = work / "state"
    shutil.copytree(state_dir, state, ignore=shutil.ignore_patterns("*.sqlite*", "audit", "spill"))
    daemon = Daemon(state, "--policy", str(DEMO_POLICY))
    try:
        assert daemon.console_url, "the banner names the web console"
        address = urlsplit(daemon.console_url)
        served = ssl.get_server_certificate((address.hostname, address.port))
        assert spki_pin(served.encode()) == spki_pin(daemon.pem("server.pem")), \
            "the console serves pki/server.pem, whose key the browser pins"
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(work, ignore_errors=True)


def spki_pin(certificate_pem: bytes) -> str:
    """Base64 SHA-256 of a certificate's SubjectPublicKeyInfo (DER), as
    Chromium's --ignore-certificate-errors-spki-list takes it."""
    key = x509.load_pem_x509_certificate(certificate_pem).public_key()
    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def mint_link(daemon: Daemon, identity: str, ttl: str | None = None) -> str:
    """A one-time sign-in link for `identity`: `sluice console` over mTLS
    with that client certificate prints it as its last line."""
    command = [sluice_bin(), "console", "--endpoint", daemon.uri,
               "--state-dir", str(daemon.state_dir), "--identity", identity]
    if ttl:
        command += ["--ttl", ttl]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    link = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(re.escape(daemon.console_url) + r"/login/link/[A-Za-z0-9_-]+", link), done.stdout
    return link


def principal(daemon: Daemon, identity: str) -> str:
    """The principal id the daemon derives from `identity`'s certificate."""
    with grpc_channel(daemon, identity) as channel:
        stub = pb.connector_pb2_grpc.ConnectorServiceStub(channel)
        return stub.WhoAmI(pb.connector_pb2.WhoAmIRequest(), timeout=TIMEOUT).principal_id


def agreements_call(daemon: Daemon, identity: str, method: str, request):
    """One AgreementService call over gRPC as `identity`."""
    with grpc_channel(daemon, identity) as channel:
        stub = pb.agreement_pb2_grpc.AgreementServiceStub(channel)
        return getattr(stub, method)(request, timeout=TIMEOUT)


def agreement(daemon: Daemon, agreement_id: str):
    """An agreement as the admin reads it over gRPC."""
    return agreements_call(daemon, "admin", "GetAgreement", pb.agreement_pb2.GetAgreementRequest(id=agreement_id))


def pending_research_agreement(daemon: Daemon):
    """A pending request of the research institute for offer
    `trips/city-research`, made over gRPC. An agreement already active (an
    earlier test's) is revoked first, so the request is a new one."""
    ask = pb.agreement_pb2.RequestAgreementRequest(offer_id=RESEARCH_OFFER, purpose=RESEARCH_PURPOSE)
    requested = agreements_call(daemon, "research", "RequestAgreement", ask)
    if requested.state == pb.agreement_pb2.ACTIVE:
        agreements_call(daemon, "admin", "RevokeAgreement",
                        pb.agreement_pb2.DecideAgreementRequest(id=requested.id, reason="test: asked anew"))
        requested = agreements_call(daemon, "research", "RequestAgreement", ask)
    assert requested.state == pb.agreement_pb2.PENDING, requested
    return requested


# --- plain HTTP: status codes, headers, cookies -------------------------------

def http(daemon: Daemon, cookie: str | None = None) -> requests.Session:
    """requests to the console, trusting only the development CA, carrying
    the session cookie `cookie` if given."""
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would replace `verify`
    session.verify = str(daemon.state_dir / "pki" / "ca.pem")
    if cookie:
        session.headers["Cookie"] = f"{COOKIE}={cookie}"
    return session


def same_origin(daemon: Daemon) -> dict:
    """Headers of a form POST from one of the console's own pages, as
    Chromium sends them, so that a refusal is the form's doing, not an
    origin check's."""
    return {"Origin": daemon.console_url, "Sec-Fetch-Site": "same-origin"}


def post(daemon: Daemon, cookie: str, path: str, form: dict) -> requests.Response:
    """A form POST to `path` with the session cookie `cookie` (none if
    empty), not following the redirect."""
    return http(daemon, cookie).post(daemon.console_url + path, data=form, allow_redirects=False,
                                     timeout=TIMEOUT, headers=same_origin(daemon))


def assert_secure_headers(response: requests.Response):
    csp = response.headers.get("Content-Security-Policy", "")
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp, (response.url, csp)
    assert response.headers.get("X-Content-Type-Options") == "nosniff", response.url


def redirect_path(response: requests.Response) -> str:
    return urlsplit(urljoin(response.url, response.headers["Location"])).path


def session_cookie(response: requests.Response) -> tuple[str | None, set[str]]:
    """The session cookie's value a response sets (empty when it clears
    it), or None; with its Set-Cookie line's attributes, lowercased."""
    for line in response.raw.headers.getlist("Set-Cookie"):
        pair, *attributes = [part.strip() for part in line.split(";")]
        name, _, value = pair.partition("=")
        if name == COOKIE:
            return value, {a.lower() for a in attributes}
    return None, set()


class Forms(HTMLParser):
    """The forms of a page: `.forms`, each a dict with its `id`, `action`
    and `fields` (name → value of its inputs and named buttons)."""

    def __init__(self, html: str):
        super().__init__()
        self.forms: list[dict] = []
        self._open: dict | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "form":
            self._open = {"id": attrs.get("id"), "action": attrs.get("action", ""), "fields": {}}
            self.forms.append(self._open)
        elif tag in ("input", "button") and self._open is not None and attrs.get("name"):
            self._open["fields"][attrs["name"]] = attrs.get("value") or ""

    def handle_endtag(self, tag):
        if tag == "form":
            self._open = None


def link_login(daemon: Daemon, link: str) -> tuple[requests.Response, requests.Response]:
    """Uses a sign-in link with requests as a browser would: GETs its page
    and POSTs the page's `#link-login` form. The page, and the answer to the
    POST (not followed)."""
    page = http(daemon).get(link, timeout=TIMEOUT)
    assert page.status_code == 200, (page.status_code, page.text)
    [form] = [f for f in Forms(page.text).forms if f["id"] == "link-login"]
    answer = http(daemon).post(urljoin(link, form["action"]), data=form["fields"], allow_redirects=False,
                               timeout=TIMEOUT, headers=same_origin(daemon))
    return page, answer


def values(tree, key: str) -> list:
    """Every value of `key` anywhere in parsed JSON, however nested."""
    if isinstance(tree, dict):
        return [v for k, v in tree.items() if k == key] + [x for v in tree.values() for x in values(v, key)]
    if isinstance(tree, list):
        return [x for v in tree for x in values(v, key)]
    return []


# --- the browser ----------------------------------------------------------------

@pytest.fixture(scope="module")
def chromium(console):
    """One headless Chromium for the module: the system's browser and driver,
    a throwaway profile, and the console's key pinned (no other certificate
    error is ignored)."""
    profile = tempfile.mkdtemp(prefix="sluice-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                 f"--user-data-dir={profile}",
                 f"--ignore-certificate-errors-spki-list={spki_pin(console.pem('server.pem'))}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


class Browser:
    """The module's Chromium on the console, for one test: open pages, find
    elements (waiting for them), submit forms, save screenshots."""

    def __init__(self, driver, daemon: Daemon, test: str):
        self.driver, self.daemon = driver, daemon
        self.test = test.removeprefix("test_")
        self.shots = 0

    def open(self, path_or_url: str):
        url = path_or_url if path_or_url.startswith("https://") else self.daemon.console_url + path_or_url
        self.driver.get(url)

    def path(self) -> str:
        return urlsplit(self.driver.current_url).path

    def one(self, css: str, within=None):
        """The first element matching `css`, waiting for it to appear; a page
        showing `#error` instead fails at once, with the error's text."""
        def found(driver):
            hits = (within or driver).find_elements(By.CSS_SELECTOR, css)
            errors = [] if hits or "#error" in css else driver.find_elements(By.ID, "error")
            if errors:
                raise AssertionError(f"no `{css}` on {driver.current_url}: {errors[0].text}")
            return hits

        return WebDriverWait(self.driver, TIMEOUT).until(found, f"no `{css}` on {self.driver.current_url}")[0]

    def all(self, css: str, within=None) -> list:
        """Every element matching `css` now (no waiting)."""
        return (within or self.driver).find_elements(By.CSS_SELECTOR, css)

    def text(self, css: str) -> str:
        return self.one(css).text

    def submit(self, button):
        """Clicks a form's submit button and waits for the next page."""
        button.click()

        def gone(_):
            # Mid-navigation ChromeDriver may answer "Node with given id does
            # not belong to the document" instead of a stale element.
            try:
                button.is_enabled()
                return False
            except WebDriverException:
                return True

        WebDriverWait(self.driver, TIMEOUT).until(gone, f"the page stayed after the click on {self.driver.current_url}")
        WebDriverWait(self.driver, TIMEOUT, ignored_exceptions=[WebDriverException]).until(
            lambda d: d.execute_script("return document.readyState") == "complete",
            f"{self.driver.current_url} did not finish loading")

    def sign_in(self, identity: str) -> str:
        """Signs in as `identity` with a fresh link; the `#whoami` text."""
        self.open(mint_link(self.daemon, identity))
        self.submit(self.one("form#link-login #sign-in"))
        return self.text("#whoami")

    def cookie(self) -> str:
        cookie = self.driver.get_cookie(COOKIE)
        assert cookie, f"no {COOKIE} cookie in the browser"
        return cookie["value"]

    def shot(self, name: str, element=None) -> Path:
        """A PNG of the whole page (or of `element`) in the artifact directory."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.shots += 1
        path = ARTIFACTS / f"{self.test}-{self.shots:02d}-{name}.png"
        if element is not None:
            element.screenshot(str(path))
            return path
        size = self.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        png = self.driver.execute_cdp_cmd(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip})
        path.write_bytes(base64.b64decode(png["data"]))
        return path


@pytest.fixture
def browser(console, chromium, request):
    """The module's Chromium with no cookies (signed out); a screenshot of
    the page it shows if the test fails."""
    chromium.execute_cdp_cmd("Network.clearBrowserCookies", {})
    chromium.get("about:blank")
    b = Browser(chromium, console, request.node.name)
    yield b
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        try:
            b.shot("failure")
        except WebDriverException:  # a browser that died takes no picture
            pass


# --- the tests ---------------------------------------------------------------------

def test_sign_in_with_a_one_time_link_and_the_link_is_spent(console, browser):
    """The link's page names whom it signs in; its button signs the browser
    in (`#whoami` names the admin principal). The link then works no more:
    401 and the same refusal an unknown link gets, in the browser too."""
    admin = principal(console, "admin")
    link = mint_link(console, "admin")
    browser.open(link)
    assert admin in browser.text("body")
    browser.shot("link-page")
    browser.submit(browser.one("form#link-login #sign-in"))
    assert admin in browser.text("#whoami")
    assert browser.path() == "/"
    browser.shot("signed-in")

    again = http(console).get(link, timeout=TIMEOUT)
    assert again.status_code == 401, again.status_code
    assert REFUSED_LINK in again.text
    browser.open(link)
    assert REFUSED_LINK in browser.text("#error")
    assert not browser.all("form#link-login")
    browser.shot("spent-link")


def test_an_expired_link_is_refused(console, browser):
    """A link minted for one second is refused two and a half seconds
    later: 401, no sign-in form in the browser, and posting its token
    straight to the form's target starts no session either."""
    link = mint_link(console, "admin", ttl="1s")
    time.sleep(2.5)
    refused = http(console).get(link, timeout=TIMEOUT)
    assert refused.status_code == 401, refused.status_code
    assert REFUSED_LINK in refused.text
    browser.open(link)
    assert REFUSED_LINK in browser.text("#error")
    assert not browser.all("#sign-in")
    browser.shot("expired-link")

    token = urlsplit(link).path.rsplit("/", 1)[1]
    posted = post(console, "", "/login/link", {"token": token})
    assert 400 <= posted.status_code < 500, posted.status_code
    assert not session_cookie(posted)[0]


def test_admin_approves_a_pending_agreement_and_the_audit_shows_it(console, browser):
    """The admin approves the research institute's pending request in the
    browser, with a reason. The request moves from `#pending` to `#active`;
    over gRPC it is ACTIVE, decided by the admin principal with that reason;
    the audit timeline, filtered to agreement events, has the approval, and
    its record page shows the full signed record naming the agreement. The
    chain verifies, up to the head gRPC reports."""
    admin = principal(console, "admin")
    pending = pending_research_agreement(console)
    reason = "approved in the browser: research purpose checked"
    assert admin in browser.sign_in("admin")
    browser.shot("signed-in")

    browser.open("/admin/agreements")
    row = browser.one(f'table#pending tr[data-agreement="{pending.id}"]')
    browser.one("form.approve input[name=reason]", row).send_keys(reason)
    browser.submit(browser.one("form.approve button.approve", row))
    browser.one(f'table#active tr[data-agreement="{pending.id}"]')
    assert browser.path() == "/admin/agreements"
    assert not browser.all(f'table#pending tr[data-agreement="{pending.id}"]')
    browser.shot("agreements-after-approval")

    decided = agreement(console, pending.id)
    assert decided.state == pb.agreement_pb2.ACTIVE, decided
    assert decided.decided_by == admin
    assert decided.reason == reason

    browser.open("/admin/audit?event=agreement")
    rows = browser.all("table#timeline tr.record")
    assert rows and {r.get_attribute("data-event") for r in rows} == {"agreement"}
    assert browser.all('table#timeline tr.record[data-outcome="requested"]')
    approvals = browser.all('table#timeline tr.record[data-outcome="approved"]')
    assert approvals
    with grpc_channel(console, "admin") as channel:
        head = pb.audit_pb2_grpc.AuditServiceStub(channel).GetChainHead(
            pb.audit_pb2.GetChainHeadRequest(), timeout=TIMEOUT)
    chain = browser.text("#chain")
    assert "verified" in chain and head.hash in chain, chain
    assert browser.text("code#verify-command")
    browser.shot("audit-timeline")

    opened = [(r.get_attribute("data-receipt"), browser.one("a.open", r).get_attribute("href"))
              for r in approvals]
    records = {}
    for receipt, href in opened:
        assert urlsplit(href).path == f"/admin/audit/{receipt}"
        browser.open(href)
        assert receipt in browser.text("#receipt")
        records[receipt] = json.loads(browser.text("pre#record"))
    [receipt] = [r for r, record in records.items() if pending.id in json.dumps(record)]
    record = records[receipt]
    assert values(record, "outcome") == ["approved"]
    assert values(record, "event") == ["agreement"]
    assert admin in values(record, "principal")
    browser.open(f"/admin/audit/{receipt}")
    browser.shot("audit-record")


def test_research_runs_a_dp_query_and_sees_intervals(console, browser):
    """The research institute (its agreement active) runs a grouped count
    in the workbench: a result table of several zones, a chart with one bar
    (or point) and one 95% error bar per zone, and the caption saying so."""
    ensure_research_agreement(console)
    assert principal(console, "research") in browser.sign_in("research")
    browser.open("/workbench")
    form = browser.one("form#query")
    sql = browser.one("textarea[name=sql]", form)
    sql.clear()
    sql.send_keys(DP_SQL)
    purpose = browser.one("input[name=purpose]", form)
    purpose.clear()
    purpose.send_keys(RESEARCH_PURPOSE)
    browser.shot("workbench-form")
    browser.submit(browser.one("button#run", form))

    answer = browser.one("table#result, #error")
    assert answer.get_attribute("id") == "result", answer.text
    columns = [th.text for th in browser.all("thead th", answer)]
    assert {"start_zone", "trips"} <= set(columns), columns
    rows = browser.all("tbody tr", answer)
    zones = [browser.one("td", row).text for row in rows]
    assert len(rows) > 1 and len(set(zones)) == len(rows), zones
    chart = browser.one("svg#chart")
    assert len(browser.all("rect.bar, circle.point", chart)) == len(rows)
    assert len(browser.all("line.interval", chart)) == len(rows)
    assert "95%" in browser.text("#interval-note")
    browser.shot("workbench-result")
    browser.shot("workbench-chart", chart)


def test_a_consumer_gets_403_on_admin_pages(console, browser):
    """Signed in as the research institute (a consumer), every admin page is
    403 naming the `admins:` list, in requests and in the browser."""
    browser.sign_in("research")
    cookie = browser.cookie()
    for path in ADMIN_PAGES:
        response = http(console, cookie).get(console.console_url + path, allow_redirects=False, timeout=TIMEOUT)
        assert response.status_code == 403, (path, response.status_code)
        assert "admins:" in response.text, path
        browser.open(path)
        assert "admins:" in browser.text("#error"), path
        assert not browser.all("table#pending, table#active, table#timeline"), path
        browser.shot("403-" + path.strip("/").replace("/", "-"))


def test_a_forged_post_without_csrf_is_refused(console, browser):
    """With the admin's session cookie but without the form's CSRF token
    (none, a wrong one, another session's), revoking the active agreement
    and approving a pending request are 403 `CSRF`, and nothing changes.
    The same POST with the form's token does approve: the refusals were the
    token's doing. (Origin and Sec-Fetch-Site are a browser's own here, so
    only the token is missing.)"""
    active = ensure_research_agreement(console)
    browser.sign_in("admin")
    cookie = browser.cookie()
    other_cookie, _ = session_cookie(link_login(console, mint_link(console, "admin"))[1])
    assert other_cookie, "a second admin session"
    other_page = http(console, other_cookie).get(console.console_url + "/admin/agreements",
                                                 allow_redirects=False, timeout=TIMEOUT)
    assert other_page.status_code == 200
    [others_token] = {f["fields"]["csrf"] for f in Forms(other_page.text).forms if "csrf" in f["fields"]}
    forgeries = [{}, {"csrf": ""}, {"csrf": "not-the-token"}, {"csrf": others_token}]

    for forged in forgeries:
        refused = post(console, cookie, f"/admin/agreements/{active.id}/revoke", {"reason": "forged", **forged})
        assert refused.status_code == 403 and "CSRF" in refused.text, (forged, refused.status_code)
    assert agreement(console, active.id).state == pb.agreement_pb2.ACTIVE

    pending = pending_research_agreement(console)
    browser.open("/admin/agreements")
    row = browser.one(f'table#pending tr[data-agreement="{pending.id}"]')
    token = browser.one("form.approve input[name=csrf]", row).get_attribute("value")
    assert token and token != others_token
    for forged in forgeries:
        refused = post(console, cookie, f"/admin/agreements/{pending.id}/approve", {"reason": "forged", **forged})
        assert refused.status_code == 403 and "CSRF" in refused.text, (forged, refused.status_code)
    assert agreement(console, pending.id).state == pb.agreement_pb2.PENDING
    browser.open("/admin/agreements")
    browser.one(f'table#pending tr[data-agreement="{pending.id}"]')
    browser.shot("still-pending-after-forgeries")

    approved = post(console, cookie, f"/admin/agreements/{pending.id}/approve",
                    {"reason": "test: with the form's token", "csrf": token})
    assert approved.status_code == 303 and redirect_path(approved) == "/admin/agreements"
    assert agreement(console, pending.id).state == pb.agreement_pb2.ACTIVE


def test_security_headers_and_cookie_flags(console):
    """The link's page, the sign-in response, a signed-in page and a refusal
    carry a Content-Security-Policy with `default-src 'none'` and
    `frame-ancestors 'none'`, and nosniff. Signing in sets the session
    cookie HttpOnly, Secure, SameSite=Strict, Path=/ and no Domain (what
    `__Host-` requires)."""
    admin = principal(console, "admin")
    link = mint_link(console, "admin")
    page, signed_in = link_login(console, link)
    assert admin in page.text
    assert_secure_headers(page)
    assert signed_in.status_code == 303 and redirect_path(signed_in) == "/"
    assert_secure_headers(signed_in)

    cookie, attributes = session_cookie(signed_in)
    assert cookie, signed_in.headers
    assert {"httponly", "secure", "samesite=strict", "path=/"} <= attributes, attributes
    assert not any(a.startswith("domain") for a in attributes), attributes

    home = http(console, cookie).get(console.console_url + "/", timeout=TIMEOUT)
    assert home.status_code == 200 and admin in home.text
    assert_secure_headers(home)
    spent = http(console).get(link, timeout=TIMEOUT)
    assert spent.status_code == 401
    assert_secure_headers(spent)


def test_an_unauthenticated_request_sees_only_the_login_page(console, browser):
    """Without a session, the home page, the workbench and the audit trail
    answer with the sign-in page (a 303 to /login, or 401) and nothing of
    theirs; a state-changing POST is refused."""
    for path in ["/", "/workbench", "/admin/audit"]:
        response = http(console).get(console.console_url + path, allow_redirects=False, timeout=TIMEOUT)
        assert response.status_code in (303, 401), (path, response.status_code)
        if response.status_code == 303:
            assert redirect_path(response) == "/login", (path, response.headers["Location"])
        landed = http(console).get(console.console_url + path, timeout=TIMEOUT)
        assert landed.status_code in (200, 401), (path, landed.status_code)
        assert_secure_headers(landed)
        browser.open(path)
        assert browser.path() in ("/login", path), browser.driver.current_url
        assert not browser.all("#whoami, table#timeline, form#query, a[href^='/admin']"), path
    browser.shot("login-page")

    active = ensure_research_agreement(console)
    refused = post(console, "", f"/admin/agreements/{active.id}/revoke", {"reason": "no session"})
    assert refused.status_code in (303, 401, 403), refused.status_code
    assert agreement(console, active.id).state == pb.agreement_pb2.ACTIVE


def test_the_audit_export_has_the_timelines_filters(console, browser):
    """The timeline's export link carries its filters and answers NDJSON
    holding every record the filtered timeline shows; a date range before
    any record leaves the timeline and the export empty."""
    ensure_research_agreement(console)
    browser.sign_in("admin")
    browser.open("/admin/audit?event=agreement")
    shown = {r.get_attribute("data-receipt") for r in browser.all("table#timeline tr.record")}
    assert shown
    export = browser.one("a#export").get_attribute("href")
    assert urlsplit(export).path == "/admin/audit/export"
    assert parse_qs(urlsplit(export).query).get("event") == ["agreement"], export
    response = http(console, browser.cookie()).get(export, timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in response.text.splitlines() if line.strip()]
    assert all(values(line, "event") == ["agreement"] for line in lines)
    assert shown <= {receipt for line in lines for receipt in values(line, "receipt_id")}

    yesterday = (datetime.now(timezone.utc) - timedelta(days=1)).date().isoformat()
    browser.open(f"/admin/audit?event=agreement&from={yesterday}")
    assert browser.all("table#timeline tr.record")
    browser.open("/admin/audit?event=agreement&to=2000-01-01")
    browser.one("table#timeline")
    assert not browser.all("table#timeline tr.record")
    empty = http(console, browser.cookie()).get(browser.one("a#export").get_attribute("href"), timeout=TIMEOUT)
    assert empty.status_code == 200 and not empty.text.strip()


# --- what one user cannot do to the others -----------------------------------------

def sign_in(daemon: Daemon, identity: str) -> str:
    """A session cookie for `identity`, through a fresh link (requests)."""
    cookie, _ = session_cookie(link_login(daemon, mint_link(daemon, identity))[1])
    assert cookie, f"no session for {identity}"
    return cookie


def csrf_of(daemon: Daemon, cookie: str, path: str) -> str:
    """The CSRF token of the forms on `path`, for the session `cookie`."""
    page = http(daemon, cookie).get(daemon.console_url + path, timeout=TIMEOUT)
    assert page.status_code == 200, (path, page.status_code)
    [token] = {f["fields"]["csrf"] for f in Forms(page.text).forms if "csrf" in f["fields"]}
    return token


def receipts_of(daemon: Daemon, identity: str) -> list:
    """Every audit record `identity` may read, over gRPC (AuditService)."""
    records, token = [], ""
    with grpc_channel(daemon, identity) as channel:
        stub = pb.audit_pb2_grpc.AuditServiceStub(channel)
        while True:
            page = stub.ListReceipts(pb.audit_pb2.ListReceiptsRequest(page_size=1000, page_token=token),
                                     timeout=TIMEOUT)
            records.extend(page.records)
            token = page.next_page_token
            if not token:
                return records


def test_the_workbench_holds_a_bounded_answer(console):
    """An answer of large values is cut where the console's room ends (4 MiB
    of it, each value shown to 200 characters): the page says it shows fewer
    rows than the query returns, and stays small. A Flight client would
    stream all of it; the console holds what it draws."""
    cookie = sign_in(console, "supplier")
    rows = ",".join(f"({i})" for i in range(200))
    sql = f"SELECT repeat('<', 100000) AS x FROM (VALUES {rows}) t(i)"
    answer = post(console, cookie, "/workbench",
                  {"csrf": csrf_of(console, cookie, "/workbench"), "sql": sql, "purpose": ""})
    assert answer.status_code == 200, answer.text[:500]
    shown = re.search(r"Showing the first (\d+) rows", answer.text)
    assert shown, re.findall(r'id="error"[^>]*>([^<]*)', answer.text) or answer.text[-2000:]
    assert 0 < int(shown.group(1)) < 200
    assert len(answer.text) < 1_000_000, len(answer.text)
    assert "&lt;" * 200 + "…" in answer.text and "&lt;" * 201 not in answer.text


def test_explaining_as_another_principal_is_recorded_for_the_admin_only(console):
    """The playground explains only from its form (a POST with the CSRF
    token; a link with SQL explains nothing), and the audit record of each
    explanation names the admin: the principal it was asked for, a consumer
    or a made-up one claiming its organization, finds nothing new among its
    receipts."""
    research = principal(console, "research")
    before = len(receipts_of(console, "research"))
    cookie = sign_in(console, "admin")
    subject = {"principal": research, "organization": "City Research Institute",
               "sql": "SELECT count(*) FROM trips", "purpose": RESEARCH_PURPOSE}

    linked = http(console, cookie).get(console.console_url + "/admin/datasets", params=subject, timeout=TIMEOUT)
    assert linked.status_code == 200 and 'id="catalog-as"' in linked.text
    assert 'id="explanation"' not in linked.text
    refused = post(console, cookie, "/admin/datasets", subject)
    assert refused.status_code == 403 and "CSRF" in refused.text

    token = csrf_of(console, cookie, "/admin/datasets")
    explained = post(console, cookie, "/admin/datasets", {**subject, "csrf": token})
    assert explained.status_code == 200
    decision = re.search(r"<dt>decision</dt><dd><pre>([^<]*)</pre>", explained.text)
    assert decision and decision.group(1) in ("allow", "deny (precondition)"), explained.text[-3000:]
    stranger = {**subject, "principal": "spiffe://sluice.demo/org/not-a-consumer",
                "sql": "SELECT card_id FROM trips", "csrf": token}
    assert post(console, cookie, "/admin/datasets", stranger).status_code == 200

    assert len(receipts_of(console, "research")) == before
    timeline = http(console, cookie).get(console.console_url + "/admin/audit", params={"event": "explain"},
                                         timeout=TIMEOUT)
    explains = re.findall(r'<tr class="record" data-event="explain"', timeline.text)
    assert len(explains) >= 2, timeline.text[-3000:]
    admin = principal(console, "admin")
    assert all(r.principal == admin for r in receipts_of(console, "admin") if r.event == "explain")


def test_one_principal_cannot_sign_the_others_out(console):
    """Sign-ins of one principal end its own oldest sessions (16 at most),
    never another principal's."""
    admin = sign_in(console, "admin")
    first = sign_in(console, "research")
    for _ in range(20):
        sign_in(console, "research")
    home = lambda cookie: http(console, cookie).get(console.console_url + "/", allow_redirects=False,
                                                    timeout=TIMEOUT)
    assert home(admin).status_code == 200
    ended = home(first)
    assert ended.status_code == 303 and redirect_path(ended) == "/login"


def tls_socket(daemon: Daemon):
    """A TLS connection to the console, handshake done, nothing sent."""
    address = urlsplit(daemon.console_url)
    context = ssl.create_default_context(cafile=str(daemon.state_dir / "pki" / "ca.pem"))
    raw = socket.create_connection((address.hostname, address.port), timeout=TIMEOUT)
    return context.wrap_socket(raw, server_hostname=address.hostname)


def test_a_trickled_body_does_not_hold_a_connection(console):
    """A POST whose body comes a byte a second is answered (400) or closed
    about 10 s after its headers, not when the peer is done: trickling
    bodies cannot fill the console's connections."""
    address = urlsplit(console.console_url)
    connection = tls_socket(console)
    connection.sendall(f"POST /login/link HTTP/1.1\r\nHost: {address.netloc}\r\n"
                       "Content-Type: application/x-www-form-urlencoded\r\n"
                       "Content-Length: 1000\r\n\r\n".encode())
    connection.settimeout(1)
    started, answer = time.monotonic(), b""
    while time.monotonic() - started < 60:
        try:
            connection.sendall(b"a")
            chunk = connection.recv(4096)
        except socket.timeout:
            continue
        except OSError:
            break
        if not chunk:
            break
        answer += chunk
        if b"\r\n\r\n" in answer:
            break
    waited = time.monotonic() - started
    connection.close()
    assert waited < 25, f"the connection was held {waited:.0f} s"
    assert not answer or answer.startswith(b"HTTP/1.1 4"), answer[:200]


def test_one_address_cannot_take_every_connection(console):
    """Connections of one address beyond its share (32) are closed at once,
    before TLS; when they end, the address is served again."""
    held, refused = [], None
    try:
        for n in range(40):
            try:
                held.append(tls_socket(console))
            except (ssl.SSLError, OSError):
                refused = n
                break
        assert refused is not None, "40 connections from one address were all served"
        assert refused <= 32, refused
    finally:
        for connection in held:
            connection.close()
    time.sleep(0.5)
    again = http(console).get(console.console_url + "/login", timeout=TIMEOUT)
    assert again.status_code == 200


def test_a_principal_no_rule_admits_cannot_sign_in(console):
    """A certificate of the connector's CA that no entry of the usage policy
    names gets no sign-in link (PERMISSION_DENIED, saying why): the console
    holds sessions only for admins and consumers."""
    issued = subprocess.run(
        [sluice_bin(), "certs", "client", "--dir", str(console.state_dir / "pki"), "--name", "stranger",
         "--uri", "spiffe://sluice.demo/org/stranger", "--org", "Nobody Ltd", "--force"],
        capture_output=True, text=True, timeout=60)
    assert issued.returncode == 0, issued.stderr
    minted = subprocess.run(
        [sluice_bin(), "console", "--endpoint", console.uri, "--state-dir", str(console.state_dir),
         "--identity", "stranger"], capture_output=True, text=True, timeout=60)
    assert minted.returncode != 0 and not minted.stdout.strip(), minted.stdout
    assert "not admitted" in minted.stderr and "PermissionDenied" in minted.stderr, minted.stderr


def test_a_wide_answer_is_cut_by_values_not_only_bytes(console):
    """An answer of many narrow columns (a boolean is a bit in Arrow, a cell
    on the page) is cut at 100,000 values: 500 columns show 200 rows."""
    cookie = sign_in(console, "supplier")
    columns = ", ".join(f"false AS c{i}" for i in range(500))
    answer = post(console, cookie, "/workbench",
                  {"csrf": csrf_of(console, cookie, "/workbench"),
                   "sql": f"SELECT {columns} FROM machine_events", "purpose": ""})
    assert answer.status_code == 200, answer.text[:500]
    shown = re.search(r"Showing the first (\d+) rows", answer.text)
    assert shown, re.findall(r'id="error"[^>]*>([^<]*)', answer.text) or answer.text[-2000:]
    assert int(shown.group(1)) == 200
    assert len(answer.text) < 8_000_000, len(answer.text)


def test_a_peer_that_stops_reading_loses_its_connection(console):
    """A peer that pipelines requests and never reads the answers is cut off
    once the server's writes stall (15 s), not held for minutes."""
    address = urlsplit(console.console_url)
    connection = tls_socket(console)
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    request = f"GET /login HTTP/1.1\r\nHost: {address.netloc}\r\n\r\n".encode()
    started = time.monotonic()
    connection.settimeout(1)
    closed = False
    while time.monotonic() - started < 90 and not closed:
        try:
            connection.sendall(request * 50)
        except socket.timeout:
            continue
        except OSError:
            closed = True
    waited = time.monotonic() - started
    connection.close()
    assert closed, "the connection stayed open for 90 s"
    assert waited < 60, f"the connection was held {waited:.0f} s"
