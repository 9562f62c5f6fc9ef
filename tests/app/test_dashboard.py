"""The dashboard in a real Chromium (Playwright) against a real service, worker and pipeline results.

One module-scoped service runs a small pipeline on `llama_mediated` (planted mediators in the final MLP);
each page is checked against the JSON API's own answer for the same thing, and screenshots land in the
test's tmp folder. Skipped, with the reason, where Chromium or the `playwright` package is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from crosspatch.app.store.migrate import upgrade
from crosspatch.engine.organisms import organism_path
from crosspatch.engine.prompts import load_prompts
from tests.app.live import client, finished_job, live_service, live_settings, start_worker

pytestmark = pytest.mark.slow
ORGANISM = "llama_mediated"
CHROMIUM = os.environ.get("CROSSPATCH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install playwright)")
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    t0 = time.perf_counter()
    root = tmp_path_factory.mktemp("dashboard")
    org = organism_path(ORGANISM)
    settings = live_settings(
        root, [org.parent], dictionary_roots=[root / "data"], heartbeat_seconds=0.5, poll_seconds=0.2
    )
    users = {"root": "admin", "ada": "researcher", "bob": "researcher"}
    pairs = {ORGANISM: ("llama", org / "pt", org / "it")}
    prompts = [
        {"id": p.id, "text": p.text, "category": p.category} for p in load_prompts(org / "prompts.jsonl")
    ]
    spec = {
        "kind": "pipeline",
        "pair_ids": [ORGANISM],
        "prompts": prompts,
        "max_new_tokens": 16,
        "n_resamples": 100,
        "boundary": "sweep",
        "dictionary": {  # as tests/app/test_pipeline.py: a width-16 batch-top-k SAE at the organism's L0
            "architecture": "batchtopk",
            "width": 16,
            "k": 0.5,
            "training_tokens": 12_000,  # enough for the planted latents to rank first
            "continuation_tokens": 160,
            "batch_size": 128,
            "lr": 3e-3,
            "min_heldout_tokens": 100,
            "max_alive_fraction": 0.5,
        },
        "mediation": {"top_k": 4, "ks": [4], "neighbours": 2, "allow_failed_gate": True},
        "controls": ["offmanifold"],
        "control_options": {"seeds": [0], "alphas": [0.0, 0.5, 1.0]},
    }
    upgrade(settings.database_url)  # the worker (slow to import) starts while the service comes up
    worker = start_worker(settings, root / "worker.log")
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: (worker.terminate(), worker.wait(timeout=60)))  # however setup ends
        server, keys = stack.enter_context(live_service(settings, users, pairs))
        try:
            with client(server, keys["ada"]) as c:
                r = c.post("/jobs", json={"spec": spec})
                assert r.status_code == 201, r.text
                job = finished_job(c, r.json()["id"])
                assert job["status"] == "succeeded", (job, c.get(f"/jobs/{job['id']}/logs").json())
        finally:
            worker.terminate()
            worker.wait(timeout=60)
        setup_s = time.perf_counter() - t0
        # with no worker left, new jobs stay queued: bob's private one, and one ada may cancel
        small = {"kind": "divergence", "pair_id": ORGANISM, "prompts": prompts[:2], "max_new_tokens": 4}
        with client(server, keys["bob"]) as c:
            r = c.post("/jobs", json={"spec": small, "share": "owner"})
            assert r.status_code == 201, r.text
            bob_job = r.json()["id"]
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
                args=CHROMIUM_ARGS,  # Playwright adds --user-data-dir=<a new empty temp dir> itself
            )
            t1 = time.perf_counter()
            try:
                yield {
                    "server": server,
                    "keys": keys,
                    "job": job,
                    "bob_job": bob_job,
                    "browser": browser,
                    "shots": tmp_path_factory.mktemp("screenshots"),
                    "org": org,
                }
            finally:
                browser.close()
                print(
                    f"\ndashboard: pipeline setup {setup_s:.1f} s, browser tests {time.perf_counter() - t1:.1f} s"
                )


def _login(dash: dict[str, Any], user: str) -> Any:
    """A fresh browser context logged in as `user` through the login form."""
    context = dash["browser"].new_context(viewport={"width": 1366, "height": 900})
    page = context.new_page()
    page.goto(f"{dash['server'].url}/ui/queue")
    assert "/ui/login" in page.url  # not logged in: the login form
    page.get_by_label("API key").fill(dash["keys"][user])
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url("**/ui/queue")
    return page


def _api(dash: dict[str, Any], user: str, path: str, **params: Any) -> Any:
    with client(dash["server"], dash["keys"][user]) as c:
        r = c.get(path, params=params)
        assert r.status_code == 200, r.text
        return r.json()


def test_login_queue_and_job_report_show_the_api_numbers(dash: dict[str, Any]) -> None:
    page = _login(dash, "ada")
    job_id = dash["job"]["id"]
    cookie = next(c for c in page.context.cookies() if c["name"] == "crosspatch_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""  # the key is out of the page's reach
    # the queue: who runs what, state, progress; bob's private job listed without a link or cancel button
    row = page.locator(f"tr[data-job='{job_id}']")
    assert row.locator("[data-field=status]").inner_text() == "succeeded"
    assert row.locator("td").nth(1).inner_text() == "ada"
    assert row.locator("progress").get_attribute("value") == "1.0"
    bob = page.locator(f"tr[data-job='{dash['bob_job']}']")
    assert bob.locator("td").nth(1).inner_text() == "bob" and "(private)" in bob.inner_text()
    assert bob.locator("a").count() == 0 and bob.get_by_role("button").count() == 0
    page.screenshot(path=str(dash["shots"] / "queue.png"), full_page=True)

    # the job report: first paint measured in the browser, the 2x2 equal to the API's summaries
    page.goto(f"{dash['server'].url}/ui/jobs/{job_id}")
    paint = page.evaluate(  # the browser's own paint timing (buffered: it may precede this script)
        """() => new Promise(resolve => new PerformanceObserver((list, observer) => {
             const fcp = list.getEntries().find(e => e.name === 'first-contentful-paint');
             if (fcp) { observer.disconnect(); resolve({fcp: fcp.startTime,
               response: performance.getEntriesByType('navigation')[0].responseEnd}); }
           }).observe({type: 'paint', buffered: true}))"""
    )
    print(
        f"\njob report: first contentful paint {paint['fcp']:.0f} ms (HTML received at {paint['response']:.0f} ms)"
    )
    summaries = _api(dash, "ada", f"/jobs/{job_id}/results/summaries", limit=100_000)["data"]
    inter = next(
        r
        for r in summaries
        if r["level"] == "pair"
        and r["headline"]
        and r["statistic"] == "interaction"
        and r["readout"] == "it"
        and r["subset"] == "all"
    )
    cell = page.locator(f"#grid tr[data-level=pair][data-pair='{ORGANISM}'] td[data-stat=interaction]")
    assert float(cell.locator(".est").get_attribute("data-value")) == inter["estimate"]
    ci = cell.locator(".ci")
    assert (float(ci.get_attribute("data-lo")), float(ci.get_attribute("data-hi"))) == (
        inter["ci_low"],
        inter["ci_high"],
    )
    assert inter["ci_low"] > 0  # the planted upstream-dependent effect
    for stat in ("y_ptup_ptlate", "y_itup_itlate"):
        want = next(
            r["estimate"]
            for r in summaries
            if r["level"] == "pair"
            and r["headline"]
            and r["statistic"] == stat
            and r["readout"] == "it"
            and r["subset"] == "all"
        )
        got = page.locator(f"#grid tr[data-level=pair] td[data-stat={stat}] .est").get_attribute("data-value")
        assert float(got) == want
    # the sweep is drawn (one point per boundary), controls, mediation and downloads are listed
    sweep = page.locator("#h-sweep ~ figure svg")
    n_boundaries = len({r["boundary"] for r in summaries if r["level"] == "pair"})
    assert n_boundaries > 1 and sweep.locator("circle").count() == n_boundaries
    assert page.locator("table caption", has_text="offmanifold").count() == 1
    assert page.locator("#top-latents li").count() >= 1
    downloads = page.locator("#downloads a")
    names = {downloads.nth(i).inner_text() for i in range(downloads.count())}
    assert {"cells", "summaries", "events", "feature_effects", "offmanifold"} <= names
    with page.expect_download() as dl:
        page.locator("#downloads a", has_text="summaries").first.click()
    import pyarrow.parquet as pq

    table = pq.read_table(dl.value.path())
    assert table.num_rows == len(summaries)
    page.screenshot(path=str(dash["shots"] / "job.png"), full_page=True)
    page.context.close()


def test_families_and_feature_pages_match_the_api(dash: dict[str, Any]) -> None:
    page = _login(dash, "ada")
    url = dash["server"].url
    api = _api(dash, "ada", "/features/families")["data"]
    want = next(r for r in api if r["pair_id"] == ORGANISM)
    page.goto(f"{url}/ui/families")
    row = page.locator(f"#families tr[data-pair='{ORGANISM}']")
    assert row.locator(".est").get_attribute("data-value") == repr(want["interaction"])
    assert float(row.locator(".ci").get_attribute("data-lo")) == want["ci_low"]
    assert float(row.locator(".ci").get_attribute("data-hi")) == want["ci_high"]
    # filter by prompt category and by position: the same rows as the job's own subset summaries
    job_id = dash["job"]["id"]
    summaries = _api(dash, "ada", f"/jobs/{job_id}/results/summaries", limit=100_000)["data"]

    def subset_row(subset: str) -> dict:
        return next(
            r
            for r in summaries
            if r["level"] == "pair"
            and r["headline"]
            and r["statistic"] == "interaction"
            and r["readout"] == "it"
            and r["subset"] == subset
        )

    page.get_by_label("Prompt category").fill("delayed")
    page.get_by_role("button", name="Show").click()
    page.wait_for_url("**category=delayed**")
    assert page.locator("#subset").inner_text() == "category=delayed"
    got = float(page.locator(f"#families tr[data-pair='{ORGANISM}'] .est").get_attribute("data-value"))
    assert got == subset_row("category=delayed")["estimate"] != want["interaction"]
    page.goto(f"{url}/ui/families?position=3")
    got = float(page.locator(f"#families tr[data-pair='{ORGANISM}'] .est").get_attribute("data-value"))
    assert got == subset_row("position>=3")["estimate"]
    page.screenshot(path=str(dash["shots"] / "families.png"), full_page=True)

    # the feature page of the top latent: the service's page (GET /features/page), its top events in order
    top = _api(dash, "ada", "/features/top", family="llama", limit=1, include_failed_gate="true")["data"][0]
    events = _api(dash, "ada", f"/features/{top['dictionary_id']}/{top['latent']}", limit=10_000)["data"]
    fired = {r["prompt_id"]: r["act_itup"] for r in events if r["act_itup"] > 0 or r["act_ptup"] > 0}
    api_page = _api(dash, "ada", f"/features/page/{top['dictionary_id']}/{top['latent']}")
    page.goto(f"{url}/ui/features")
    page.get_by_role("link", name=f"{top['dictionary_id']} #{top['latent']}").click()
    assert page.locator("#n-active").inner_text() == str(api_page["n_events_active"]) and fired
    rows = page.locator("#events tbody tr")
    shown = [
        (
            rows.nth(i).get_attribute("data-prompt"),
            float(rows.nth(i).locator("td[data-value]").get_attribute("data-value")),
        )
        for i in range(rows.count())
    ]
    assert shown == [(e["prompt_id"], e["activation"]) for e in api_page["examples"]] and shown
    assert shown[0][1] == max(fired.values())  # the event where it fired most is on top
    assert {p for p, _ in shown} <= set(fired)
    # the planted mechanism: the top latent fires on far more upstream-IT events than upstream-PT ones
    assert sum(r["act_itup"] for r in events) > sum(r["act_ptup"] for r in events)
    page.screenshot(path=str(dash["shots"] / "feature.png"), full_page=True)
    page.context.close()


def test_roles_csrf_cancel_and_submit_through_pages(dash: dict[str, Any]) -> None:
    url, bob_job = dash["server"].url, dash["bob_job"]
    page = _login(dash, "ada")
    # another researcher's private job: no report page, no cancel (even with this session's token)
    r = page.goto(f"{url}/ui/jobs/{bob_job}")
    assert r is not None and r.status == 403
    assert "shared with its owner only" in page.locator("[role=alert]").inner_text()
    assert page.goto(f"{url}/ui/users").status == 403  # the users page is the admins'
    # submit through the generated form (prefilled from the example; the pair and prompts edited)
    page.goto(f"{url}/ui/submit/divergence")
    assert page.get_by_label("max new tokens").input_value() == "32"  # the example's value
    page.get_by_label("pair id").fill(ORGANISM)
    page.get_by_label("prompts (JSON)").fill(json.dumps([{"id": "d1", "text": "glad : black"}]))
    page.get_by_label("max new tokens").fill("0")
    page.get_by_role("button", name="Submit").click()
    assert "max_new_tokens" in page.locator("#form-error").inner_text()  # the schema's own check
    page.get_by_label("max new tokens").fill("4")
    page.get_by_role("button", name="Submit").click()
    page.wait_for_url("**/ui/jobs/*")
    own_job = page.url.rsplit("/", 1)[1]
    assert _api(dash, "ada", f"/jobs/{own_job}")["owner"] == "ada"
    page.screenshot(path=str(dash["shots"] / "submitted.png"), full_page=True)

    # cancelling another's job with a valid token of this session: refused, still queued
    page.goto(f"{url}/ui/queue")
    token = page.locator("form[action='/ui/logout'] input[name=csrf_token]").input_value()
    status = page.evaluate(
        "async ([u, t]) => (await fetch(u, {method: 'POST', headers: {'Content-Type': "
        "'application/x-www-form-urlencoded'}, body: 'csrf_token=' + t})).status",
        [f"/ui/jobs/{bob_job}/cancel", token],
    )
    assert status == 403 and _api(dash, "bob", f"/jobs/{bob_job}")["status"] == "queued"
    # its own job's cancel form without its CSRF token: refused; with it: cancelled
    form = page.locator(f"tr[data-job='{own_job}'] form")
    form.locator("input[name=csrf_token]").evaluate("e => e.remove()")
    form.get_by_role("button").click()
    assert "CSRF token is missing" in page.locator("[role=alert]").inner_text()
    assert _api(dash, "ada", f"/jobs/{own_job}")["status"] == "queued"
    page.goto(f"{url}/ui/queue")
    page.locator(f"tr[data-job='{own_job}']").get_by_role("button", name="Cancel").click()
    page.wait_for_url("**/ui/queue")
    assert page.locator(f"tr[data-job='{own_job}'] [data-field=status]").inner_text() == "cancelled"
    assert _api(dash, "ada", f"/jobs/{own_job}")["status"] == "cancelled"
    # log out: the cookie is gone and pages ask for the key again
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url("**/ui/login")
    page.goto(f"{url}/ui/queue")
    assert "/ui/login" in page.url
    page.context.close()

    admin = _login(dash, "root")
    admin.goto(f"{url}/ui/users")
    assert {"root", "ada", "bob"} <= set(admin.locator("#users tbody th").all_inner_texts())
    assert admin.goto(f"{url}/ui/jobs/{bob_job}").status == 200  # admins see every job
    admin.screenshot(path=str(dash["shots"] / "users.png"), full_page=True)
    admin.context.close()
