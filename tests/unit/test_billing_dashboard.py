"""The dashboard's read models, from plain values; its sign-in script, under Node."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
from decimal import Decimal
from pathlib import Path

from services.billing.export import safe_file_name as file_name
from services.billing.web.queries import CentreHour
from services.billing.web.routes import centre_usage

HOUR = dt.datetime(2026, 11, 1, 0, tzinfo=dt.UTC)


def hour(offset: int, gpu_seconds: str, util_gpu_seconds: str) -> CentreHour:
    return CentreHour(
        hour_start=HOUR + dt.timedelta(hours=offset),
        gpu_seconds=Decimal(gpu_seconds),
        util_gpu_seconds=Decimal(util_gpu_seconds),
        projects=1,
        nodes_online=2,
        complete=True,
    )


def test_centre_usage_gives_gpus_on_average_and_utilization_weighted_by_gpu_seconds() -> None:
    usage = centre_usage("2026-11", [hour(0, "28800", "23040"), hour(1, "7200", "0")])

    assert [h.allocated_gpus for h in usage.hours] == ["8.00", "2.00"]
    assert [h.util_pct for h in usage.hours] == ["80.0", "0.0"]
    assert usage.allocated_gpu_hours == "10.00"
    assert usage.peak_allocated_gpus == "8.00"
    assert usage.mean_util_pct == "64.0"


def test_an_hour_with_nodes_online_but_nothing_allocated_has_no_utilization() -> None:
    usage = centre_usage("2026-11", [hour(0, "0", "0")])

    assert usage.hours[0].allocated_gpus == "0.00" and usage.hours[0].util_pct is None
    assert usage.mean_util_pct is None


def test_an_empty_period_has_zero_totals() -> None:
    usage = centre_usage("2026-11", [])

    assert (usage.hours, usage.allocated_gpu_hours, usage.peak_allocated_gpus) == (
        [],
        "0.00",
        "0.00",
    )


def test_download_names_keep_only_safe_characters() -> None:
    assert file_name("INV-2026-11-hkgai-llm") == "INV-2026-11-hkgai-llm"
    assert file_name('INV-2026-11-a"b/香港') == "INV-2026-11-a_b___"


def sign_in_with(token_response: dict[str, str]) -> dict[str, object]:
    """Runs the dashboard's finishSignIn (app.js) under Node with the token endpoint answering
    `token_response`: the problem it reports and the token it keeps."""
    node = shutil.which("node")
    assert node, "Node.js is not installed: run scripts/ensure-system-packages.sh as root"
    source = (
        Path(__file__).resolve().parents[2] / "services/billing/web/static/app.js"
    ).read_text()
    function = re.search(r"^async function finishSignIn\(sso\) \{.*?^\}$", source, re.S | re.M)
    assert function is not None, "finishSignIn is gone from app.js"
    script = f"""
const TOKEN_KEY = "token", SIGN_IN_KEY = "sign-in", stored = {{}};
const state = {{ token: "", period: "" }};
const location = {{ search: "?code=c1&state=s1", pathname: "/", hash: "" }};
const sessionStorage = {{ getItem: () => JSON.stringify({{ state: "s1", verifier: "v" }}),
  removeItem: () => {{}} }};
const localStorage = {{ setItem: (key, value) => {{ stored[key] = value; }} }};
const history = {{ replaceState: () => {{}} }};
const redirectUri = () => "http://127.0.0.1/";
const fetch = async () => ({{ ok: true, status: 200, json: async () => ({json.dumps(token_response)}) }});
{function.group(0)}
finishSignIn({{ token_endpoint: "http://idp/token", client_id: "gpumeter" }}).then((problem) =>
  console.log(JSON.stringify({{ problem, token: state.token, stored: stored[TOKEN_KEY] || "" }})));
"""
    done = subprocess.run([node, "-e", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_sign_in_keeps_the_access_token_as_the_bearer() -> None:
    got = sign_in_with({"access_token": "a.b.c", "id_token": "i.d.t"})
    assert got == {"problem": "", "token": "a.b.c", "stored": "a.b.c"}


def test_sign_in_never_takes_an_id_token_as_the_bearer() -> None:
    got = sign_in_with({"id_token": "i.d.t", "token_type": "Bearer"})
    assert got["token"] == got["stored"] == ""
    assert "no access token" in str(got["problem"])
