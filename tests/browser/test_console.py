"""The console in a real browser (Debian's chromium driven by Playwright).

Run by tests/console_browser.rs against the real `tidepool serve`; it can also be
run by hand:

    TIDEPOOL_URL=http://127.0.0.1:8080 TIDEPOOL_SHOTS=/tmp/shots \
    TIDEPOOL_PASSWORD=... python3 tests/browser/test_console.py

Users (made by the Rust test with `tidepool user add`): ann (default:Owner),
rita (default:ReadOnly), otto (other:Owner), all with TIDEPOOL_PASSWORD.
Projects: demo (the repository's) and slow (many rows, tiny batches).
Asserts what a person sees: text, counts, buttons present or absent.
"""

import os
import re
import sys

from playwright.sync_api import expect, sync_playwright

BASE = os.environ["TIDEPOOL_URL"].rstrip("/")
SHOTS = os.environ["TIDEPOOL_SHOTS"]
PASSWORD = os.environ["TIDEPOOL_PASSWORD"]
CHROMIUM = os.environ.get("TIDEPOOL_CHROMIUM", "/usr/bin/chromium")
# Generous: the machine running CI may be busy; every wait polls a condition.
expect.set_options(timeout=60_000)

BROWSER_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

problems = []  # page errors seen in the browser: each fails the test


def step(name):
    print(f"step: {name}", flush=True)


def shoot(page, name, full_page=True):
    """The page at 1280 px and at 390 px (phone), full length unless told.
    A page that keeps growing (a live log) is shot at the window's size: a
    full-length shot of it waits for a height that never settles."""
    for width in (1280, 390):
        page.set_viewport_size({"width": width, "height": 900})
        # The resize has reached the page and two frames have been laid out since.
        page.wait_for_function(f"() => window.innerWidth === {width}")
        page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        page.screenshot(path=os.path.join(SHOTS, f"{name}-{width}.png"), full_page=full_page)
    page.set_viewport_size({"width": 1280, "height": 900})


def new_page(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    page.set_default_timeout(60_000)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" and "401" not in m.text else None)
    return ctx, page


def log_in(page, user):
    page.goto(BASE + "/")
    expect(page.get_by_role("heading", name="Log in to tidepool")).to_be_visible()
    page.get_by_label("User").fill(user)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Runs")).to_be_visible()
    expect(page.locator("#who")).to_contain_text(user)


def counter(card, name):
    return card.locator(f'[data-counter="{name}"] b')


def run_id_of(page):
    m = re.search(r"#/runs/([0-9a-f-]{36})", page.url)
    assert m, f"not on a run page: {page.url}"
    return m.group(1)


def start_job(page, project, job, log_level=None, **fields):
    page.goto(f"{BASE}/#/projects/{project}/jobs/{job}")
    expect(page.get_by_role("heading", name=f"{project} / {job}")).to_be_visible()
    for label, value in fields.items():
        page.get_by_label(label).fill(value)
    if log_level is not None:
        page.get_by_label("Log level").select_option(log_level)
    page.get_by_role("button", name="Start run").click()
    expect(page.locator("main h1 .badge")).to_be_visible()
    return run_id_of(page)


def open_mode(browser):
    """A server without users (loopback only): no login, everything allowed."""
    ctx, page = new_page(browser)
    step("open mode: no login page")
    page.goto(BASE + "/")
    expect(page.get_by_role("heading", name="Runs")).to_be_visible()
    expect(page.locator("#who")).to_contain_text("open mode")
    step("open mode: start the demo job; 1,000 rows, 997 inserts, 3 errors")
    start_job(page, "demo", "contacts")
    expect(page.locator("main h1 .badge")).to_have_text("Complete")
    card = page.locator('.card[data-job="contacts"]')
    expect(counter(card, "totalRows")).to_have_text("1,000")
    expect(counter(card, "inserts")).to_have_text("997")
    expect(counter(card, "errors")).to_have_text("3")
    expect(page.get_by_role("table", name="Row errors").locator("tbody tr")).to_have_count(3)
    expect(page.get_by_role("button", name="Run again")).to_be_visible()
    ctx.close()


def check_problems():
    # A 404 of an optional API is not a page error; anything else is.
    real = [p for p in problems if "404" not in p]
    assert not real, "the browser reported errors:\n" + "\n".join(real)


def main():
    os.makedirs(SHOTS, exist_ok=True)
    if os.environ.get("TIDEPOOL_MODE") == "open":
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
            open_mode(browser)
            browser.close()
        check_problems()
        print("console browser test (open mode): OK")
        return
    with sync_playwright() as pw:
        # Playwright gives every launch a fresh, temporary user-data dir.
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        ctx, page = new_page(browser)

        step("a wrong password is refused with a message")
        page.goto(BASE + "/")
        expect(page.get_by_role("heading", name="Log in to tidepool")).to_be_visible()
        shoot(page, "login")
        page.get_by_label("User").fill("ann")
        page.get_by_label("Password").fill("not the password")
        page.get_by_role("button", name="Log in").click()
        expect(page.get_by_role("alert")).to_contain_text("incorrect")

        step("ann logs in")
        log_in(page, "ann")

        step("the demo job's page: mappings, chain, start form")
        page.goto(f"{BASE}/#/projects/demo/jobs/contacts")
        expect(page.get_by_role("heading", name="demo / contacts")).to_be_visible()
        chain = page.get_by_role("img", name="Jobs a chained run of contacts executes")
        expect(chain.locator("a.node")).to_have_count(2)
        expect(chain.locator('a[data-job="countries"]')).to_contain_text("countries")
        expect(page.get_by_role("table", name="Field mappings").get_by_role("row").filter(has=page.get_by_role("cell", name="email", exact=True))).to_contain_text("origin Email")
        expect(page.get_by_role("button", name="Preview")).to_be_visible()
        shoot(page, "job")

        step("keyboard: Tab reaches the form's actions, focus is visible")
        page.locator("body").click(position={"x": 5, "y": 200})
        reached = set()
        for _ in range(40):
            page.keyboard.press("Tab")
            reached.add(page.evaluate("document.activeElement && document.activeElement.textContent.trim()"))
        for action in ("Start run", "Preview", "Runs", "Projects", "Health", "Log out"):
            assert action in reached, f"Tab never reached {action!r}; reached {sorted(x for x in reached if x)}"
        page.get_by_role("button", name="Start run").focus()
        outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
        assert outline != "none", "the focused button shows no outline"

        step("start the demo job with its chain; it ends with 1,000 rows, 997 inserts, 3 errors")
        demo_run = start_job(page, "demo", "contacts", log_level="2")
        expect(page.locator("main h1 .badge")).to_have_text("Complete")
        card = page.locator('.card[data-job="contacts"]')
        expect(counter(card, "totalRows")).to_have_text("1,000")
        expect(counter(card, "inserts")).to_have_text("997")
        expect(counter(card, "errors")).to_have_text("3")
        expect(page.locator('.card[data-job="countries"]')).to_contain_text("Complete")
        expect(page.get_by_role("region", name="Request")).to_contain_text("Argument")

        step("the row errors, with their origin values")
        card.get_by_role("button", name="see rows").click()
        errors = page.get_by_role("table", name="Row errors")
        expect(errors.locator("tbody tr")).to_have_count(3)
        for row, bad in (("101", "n/a"), ("502", "12,50"), ("903", "abc")):
            line = errors.locator("tbody tr").filter(has=page.get_by_role("cell", name=row, exact=True))
            expect(line).to_contain_text("is not a number")
            expect(line.locator(".values")).to_contain_text("Amount")
            expect(line.locator(".values")).to_contain_text(bad)
        log = page.get_by_role("table", name="Log")
        expect(log).to_contain_text("job contacts started")
        expect(log).to_contain_text("997 inserts")  # the stage summary, a Medium line
        page.get_by_label("Level").select_option("1")  # Low only: start, end, row errors
        expect(log).not_to_contain_text("stage 1 (upsert contacts): 997 inserts")
        expect(log).to_contain_text("job contacts started")
        page.get_by_label("Level").select_option("")
        shoot(page, "run")

        step("the runs page lists it, filters live in the URL")
        page.goto(BASE + "/#/runs")
        row = page.locator(f'tr[data-run="{demo_run}"]')
        expect(row).to_contain_text("Complete")
        # The list sums the chain: 1,000 contacts + 7 countries.
        expect(row.get_by_role("cell", name="1,007", exact=True)).to_be_visible()
        expect(row.get_by_role("cell", name="3", exact=True)).to_be_visible()
        page.get_by_label("Status").select_option("Failed")
        expect(page).to_have_url(re.compile(r"status=Failed"))
        expect(page.locator(f'tr[data-run="{demo_run}"]')).to_have_count(0)
        page.goto(BASE + "/#/runs?project=demo&status=Complete")
        expect(page.locator(f'tr[data-run="{demo_run}"]')).to_be_visible()

        step("cancel a long run from its page")
        slow_run = start_job(page, "slow", "load", log_level="3", Argument="2026-11-30")
        expect(page.locator("main h1 .badge")).to_have_text("Running")
        step("the log shows its lines while the run goes")
        live_log = page.get_by_role("table", name="Log")
        expect(live_log).to_contain_text("job load started")
        expect(live_log).to_contain_text("row 1: stage 1")
        shown = page.get_by_role("region", name="Log").locator(".pager .sub")
        expect(shown).to_have_text(re.compile(r"lines shown"))
        expect(shown).not_to_have_text(shown.inner_text())  # more lines come in while it runs
        expect(page.locator("main h1 .badge")).to_have_text("Running")
        card = page.locator('.card[data-job="load"]')
        expect(counter(card, "totalRows")).not_to_have_text("0")
        step("no layout jumps while the counters move")
        rows_before = counter(card, "totalRows").inner_text()
        boxes = (card.bounding_box(), page.get_by_role("button", name="Cancel run").bounding_box())
        expect(counter(card, "totalRows")).not_to_have_text(rows_before)
        after = (card.bounding_box(), page.get_by_role("button", name="Cancel run").bounding_box())
        assert boxes == after, f"the job card or the Cancel button moved while the run updated: {boxes} -> {after}"
        shoot(page, "run-live", full_page=False)
        page.get_by_role("button", name="Cancel run").click()
        expect(page.locator("main h1 .badge")).to_have_text("Cancelled")
        expect(page.get_by_role("button", name="Cancel run")).to_have_count(0)

        step("run again: a new run with the same parameters")
        page.get_by_role("button", name="Run again").click()
        expect(page).not_to_have_url(re.compile(slow_run))
        again_run = run_id_of(page)
        expect(page.get_by_role("region", name="Request")).to_contain_text("2026-11-30")
        expect(page.locator("main h1 .badge")).to_have_text(re.compile("Queued|Running"))
        page.get_by_role("button", name="Cancel run").click()
        expect(page.locator("main h1 .badge")).to_have_text("Cancelled")
        page.goto(BASE + "/#/runs")
        expect(page.locator(f'tr[data-run="{again_run}"]')).to_contain_text("2026-11-30")
        expect(page.locator(f'tr[data-run="{slow_run}"]')).to_contain_text("Cancelled")
        shoot(page, "runs")

        step("projects and health")
        page.goto(BASE + "/#/projects")
        expect(page.get_by_role("link", name="demo", exact=True)).to_be_visible()
        shoot(page, "projects")
        page.get_by_role("link", name="demo", exact=True).click()
        expect(page.get_by_role("table", name="Jobs")).to_contain_text("countries")
        # Each job's next and needs, and the project's job graph drawn from them.
        expect(page.locator('tr[data-job="contacts"] td.next')).to_have_text("countries")
        expect(page.locator('tr[data-job="countries"] td.needs')).to_have_text("–")
        graph = page.get_by_role("img", name="Job graph of demo")
        expect(graph).to_be_visible()
        expect(graph.locator("a.node")).to_have_count(2)
        expect(graph.locator("path.edge")).to_have_count(1)
        expect(graph.locator("path.edge title")).to_have_text("countries starts after contacts")
        shoot(page, "project")
        graph.locator('a[data-job="countries"]').click()
        expect(page.get_by_role("heading", name="demo / countries")).to_be_visible()
        page.goto(BASE + "/#/health")
        expect(page.get_by_text("Queued runs")).to_be_visible()
        # The embedded store has one node: this one, alive.
        node = page.locator("#nodes tbody tr")
        expect(node).to_have_count(1)
        expect(node).to_contain_text("active")
        expect(node).to_contain_text("(this node)")
        shoot(page, "health")

        step("log out")
        page.get_by_role("button", name="Log out").click()
        expect(page.get_by_role("heading", name="Log in to tidepool")).to_be_visible()
        page.goto(BASE + "/#/runs")
        expect(page.get_by_role("heading", name="Log in to tidepool")).to_be_visible()
        ctx.close()

        step("a ReadOnly user sees the runs but no start or cancel button")
        ctx, page = new_page(browser)
        log_in(page, "rita")
        expect(page.locator(f'tr[data-run="{demo_run}"]')).to_be_visible()
        page.goto(f"{BASE}/#/projects/demo/jobs/contacts")
        expect(page.get_by_role("heading", name="demo / contacts")).to_be_visible()
        expect(page.get_by_text("read-only")).to_be_visible()
        expect(page.get_by_role("button", name="Start run")).to_have_count(0)
        page.goto(f"{BASE}/#/runs/{demo_run}")
        expect(page.locator("main h1 .badge")).to_have_text("Complete")
        expect(page.get_by_role("button", name="Run again")).to_have_count(0)
        expect(page.get_by_role("button", name="Cancel run")).to_have_count(0)
        shoot(page, "run-readonly")
        ctx.close()

        step("a user of another instance sees none of these runs")
        ctx, page = new_page(browser)
        log_in(page, "otto")
        expect(page.get_by_text("No runs match")).to_be_visible()
        for run in (demo_run, slow_run):
            expect(page.locator(f'tr[data-run="{run}"]')).to_have_count(0)
        page.goto(f"{BASE}/#/runs/{demo_run}")
        expect(page.get_by_role("heading", name="Run not found")).to_be_visible()
        page.goto(f"{BASE}/#/projects")
        expect(page.get_by_role("link", name="demo", exact=True)).to_have_count(0)
        ctx.close()

        step("preview: the first rows as they would be written, nothing written")
        ctx, page = new_page(browser)
        log_in(page, "ann")
        page.goto(f"{BASE}/#/projects/demo/jobs/contacts")
        page.get_by_role("button", name="Preview").click()
        preview = page.get_by_role("table", name="Preview")
        expect(preview).to_contain_text("full_name")
        # The demo run above wrote these contacts: the preview would update them.
        expect(preview.get_by_text("Update", exact=True).first).to_be_visible()
        expect(preview).to_contain_text("dev.smith1@example.com")
        shoot(page, "preview")
        step("the preview recorded no run")
        page.goto(f"{BASE}/#/runs?project=demo")
        expect(page.locator(f'tr[data-run="{demo_run}"]')).to_be_visible()
        expect(page.locator("tr[data-run]")).to_have_count(1)
        ctx.close()
        browser.close()

    check_problems()
    print(f"screenshots: {SHOTS}")
    print("console browser test: OK")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)
