"""Invoice arithmetic of docs/contracts.md §4, as plain functions over plain values.

Imports only the standard library and schemas/: no I/O, no clock. Money is exact: products are taken
as `Fraction`s and rounded half-up once, where each figure is defined.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_DOWN, ROUND_HALF_UP, Decimal
from fractions import Fraction
from zoneinfo import ZoneInfo

from schemas.catalog import Project, RateCard
from schemas.invoice import Invoice, InvoiceLine

HONG_KONG = ZoneInfo("Asia/Hong_Kong")
SECONDS_PER_HOUR = 3600
CENT = Decimal("0.01")
GPU_HOURS_SHOWN = Decimal("0.000001")
# ASCII digits only (`\d` takes any Unicode digit) and with fullmatch (`$` takes a trailing newline).
PERIOD_PATTERN = re.compile(r"([0-9]{4})-(0[1-9]|1[0-2])")
# Years whose months, their bounds and the month after them, are plain instants in UTC and in
# Asia/Hong_Kong (year 1 or 9999 overflow there); metering takes no usage before 2000 at all.
MIN_PERIOD_YEAR, MAX_PERIOD_YEAR = 2000, 2999
PERIOD_RULE = f"a month written YYYY-MM, year {MIN_PERIOD_YEAR} to {MAX_PERIOD_YEAR}"
PERIOD_JSON_PATTERN = r"^2[0-9]{3}-(0[1-9]|1[0-2])$"  # the same rule, for the OpenAPI document
# Times a query may name: far beyond any usage, and convertible to UTC and Asia/Hong_Kong.
MIN_QUERY_TIME = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
MAX_QUERY_TIME = dt.datetime(3000, 1, 1, tzinfo=dt.UTC)
QUERY_TIME_RULE = (
    "an RFC 3339 time (UTC when it has no offset) from 1970-01-01T00:00:00Z"
    " to 3000-01-01T00:00:00Z inclusive"
)
# RFC 3339 date-time as written, the offset optional: no bare numbers (read as Unix seconds by
# pydantic), dates or ISO 8601 week forms.
RFC3339_PATTERN = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})?"
)

FLAG_UNKNOWN_PROJECT = "unknown_project"
FLAG_UNPRICED_USAGE = "unpriced_usage"
FLAG_SUBSIDY_CAPPED = "subsidy_capped"


class InvalidPeriod(ValueError):
    """A period that is not a calendar month written YYYY-MM, of a year the billing takes."""


class InvalidTime(ValueError):
    """A query time outside the range billing can represent and compare."""


# --- periods (calendar months in Asia/Hong_Kong) -------------------------------------------------


def parse_period(text: str) -> str:
    """Return `text` when it is a valid YYYY-MM period (PERIOD_RULE), else raise InvalidPeriod."""
    match = PERIOD_PATTERN.fullmatch(text)
    if not match or not MIN_PERIOD_YEAR <= int(match.group(1)) <= MAX_PERIOD_YEAR:
        raise InvalidPeriod(f"period {text[:40]!r} is not {PERIOD_RULE}")
    return text


def query_time(moment: dt.datetime) -> dt.datetime:
    """`moment` as an aware UTC instant (naive means UTC) when QUERY_TIME_RULE allows it, else
    raise InvalidTime. Checked before any arithmetic: year 1 or 9999 overflow when converted."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    try:
        utc = moment.astimezone(dt.UTC)
    except (OverflowError, ValueError):
        raise InvalidTime(f"time {moment.isoformat()} is not {QUERY_TIME_RULE}") from None
    if not MIN_QUERY_TIME <= utc <= MAX_QUERY_TIME:
        raise InvalidTime(f"time {moment.isoformat()} is not {QUERY_TIME_RULE}")
    return utc


# Drafts of many projects share the same hours and days: both conversions are memoized (bounded).
_CACHE_LIMIT = 65536
_hk_dates: dict[dt.datetime, dt.date] = {}
_periods: dict[dt.date, str] = {}


def hk_date(moment: dt.datetime) -> dt.date:
    """The Asia/Hong_Kong calendar date of an aware instant."""
    found = _hk_dates.get(moment)
    if found is None:
        if moment.tzinfo is None:
            raise ValueError("naive datetime: billing needs aware UTC instants")
        found = moment.astimezone(HONG_KONG).date()
        if len(_hk_dates) >= _CACHE_LIMIT:
            _hk_dates.clear()
        _hk_dates[moment] = found
    return found


def period_of_date(day: dt.date) -> str:
    found = _periods.get(day)
    if found is None:
        found = f"{day.year:04d}-{day.month:02d}"
        if len(_periods) >= _CACHE_LIMIT:
            _periods.clear()
        _periods[day] = found
    return found


def period_of(moment: dt.datetime) -> str:
    """The billing period (HK calendar month) of an aware instant."""
    return day_and_period(moment)[1]


_days_and_periods: dict[dt.datetime, tuple[dt.date, str]] = {}


def day_and_period(moment: dt.datetime) -> tuple[dt.date, str]:
    """(HK date, billing period) of an aware instant, with one memo lookup."""
    found = _days_and_periods.get(moment)
    if found is None:
        day = hk_date(moment)
        found = (day, period_of_date(day))
        if len(_days_and_periods) >= _CACHE_LIMIT:
            _days_and_periods.clear()
        _days_and_periods[moment] = found
    return found


def next_period(period: str) -> str:
    year, month = (int(part) for part in parse_period(period).split("-"))
    return f"{year + month // 12:04d}-{month % 12 + 1:02d}"


def period_bounds(period: str) -> tuple[dt.datetime, dt.datetime]:
    """[start, end) of a period as aware UTC instants (HK midnight of the 1st to the next 1st)."""
    year, month = (int(part) for part in parse_period(period).split("-"))
    following_year, following_month = (int(part) for part in next_period(period).split("-"))
    start = dt.datetime(year, month, 1, tzinfo=HONG_KONG).astimezone(dt.UTC)
    end = dt.datetime(following_year, following_month, 1, tzinfo=HONG_KONG).astimezone(dt.UTC)
    return start, end


def hour_of_sample(time: dt.datetime, interval_s: float | Decimal) -> dt.datetime:
    """The UTC hour a sample belongs to: the hour containing `time - interval_s`
    (docs/contracts.md §4)."""
    start = time.astimezone(dt.UTC) - dt.timedelta(seconds=float(interval_s))
    return start.replace(minute=0, second=0, microsecond=0)


def invoice_period_for(usage_period: str, finalized: frozenset[str] | set[str]) -> str:
    """Where usage of `usage_period` is invoiced: that period while open, else the next open one."""
    period = usage_period
    while period in finalized:
        period = next_period(period)
    return period


def invoice_id(period: str, project_id: str) -> str:
    return f"INV-{period}-{project_id}"


# --- money ---------------------------------------------------------------------------------------


def round_half_up(value: Fraction | Decimal | int, places: int = 2) -> Decimal:
    """Round an exact value half away from zero (Decimal's ROUND_HALF_UP) to `places` decimals."""
    exact = Fraction(value)
    scale = 10**places
    magnitude = abs(exact) * scale
    units = int(magnitude + Fraction(1, 2))  # floor(|x| + 1/2): halves go away from zero
    if exact < 0:
        units = -units
    return Decimal(units).scaleb(-places).quantize(Decimal(1).scaleb(-places))


def money(value: Decimal) -> str:
    """An HKD amount as a string with two decimals."""
    return str(value.quantize(CENT, rounding=ROUND_HALF_UP))


def gpu_hours_text(gpu_seconds: Decimal) -> str:
    """GPU-hours shown to 6 decimals; amounts are never computed from this text."""
    return str(round_half_up(Fraction(gpu_seconds) / SECONDS_PER_HOUR, 6))


# --- catalog view --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pricing:
    """The parts of the catalog an invoice needs: rate cards per model, projects by id."""

    rate_cards: tuple[RateCard, ...] = ()
    projects: Mapping[str, Project] = field(default_factory=dict)
    # rate_for() per (model, day): drafts of many projects ask for the same days
    _rates: dict[tuple[str, dt.date], Decimal | None] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @classmethod
    def of(cls, rate_cards: Iterable[RateCard], projects: Iterable[Project]) -> Pricing:
        return cls(tuple(rate_cards), {project.id: project for project in projects})

    def rate_for(self, gpu_model: str, day: dt.date) -> Decimal | None:
        """Rate card with the latest effective_from not after `day`; None when there is none."""
        key = (gpu_model, day)
        if key in self._rates:
            return self._rates[key]
        if len(self._rates) >= _CACHE_LIMIT:
            self._rates.clear()
        rate = self._rates[key] = self._find_rate(gpu_model, day)
        return rate

    def _find_rate(self, gpu_model: str, day: dt.date) -> Decimal | None:
        best: RateCard | None = None
        for card in self.rate_cards:
            applies = card.gpu_model == gpu_model and card.effective_from <= day
            if applies and (best is None or card.effective_from > best.effective_from):
                best = card
        return None if best is None else best.hkd_per_gpu_hour


def is_subsidised(project: Project | None, day: dt.date) -> bool:
    subsidy = project.subsidy if project else None
    return subsidy is not None and subsidy.valid_from <= day <= subsidy.valid_to


# --- usage and invoices --------------------------------------------------------------------------


@dataclass(frozen=True)
class UsageHour:
    """GPU-seconds of one (GPU model, UTC hour) to invoice; may be a late delta of a finalized hour."""

    gpu_model: str
    hour_start: dt.datetime
    gpu_seconds: Decimal


@dataclass(frozen=True)
class ComputedLine:
    gpu_model: str
    rate_hkd: Decimal | None
    subsidised: bool
    adjustment_for_period: str | None
    gpu_seconds: Decimal
    amount_hkd: Decimal | None

    def document(self) -> InvoiceLine:
        return InvoiceLine(
            gpu_model=self.gpu_model,
            gpu_hours=gpu_hours_text(self.gpu_seconds),
            rate_hkd=None if self.rate_hkd is None else money(self.rate_hkd),
            subsidised=self.subsidised,
            amount_hkd=None if self.amount_hkd is None else money(self.amount_hkd),
            adjustment_for_period=self.adjustment_for_period,
        )


@dataclass(frozen=True)
class ComputedInvoice:
    invoice_id: str
    project_id: str
    period: str
    status: str
    lines: tuple[ComputedLine, ...]
    gross_hkd: Decimal
    subsidy_hkd: Decimal
    net_hkd: Decimal
    subsidy_cap_remaining_hkd: Decimal | None
    flags: tuple[str, ...] = ()
    invoice_number: str | None = None  # set at finalization, with the dates
    issued_on: dt.date | None = None
    due_on: dt.date | None = None

    @property
    def has_unpriced_usage(self) -> bool:
        return any(line.rate_hkd is None for line in self.lines)

    def document(self) -> Invoice:
        return Invoice(
            invoice_id=self.invoice_id,
            project_id=self.project_id,
            period=self.period,
            status="finalized" if self.status == "finalized" else "draft",
            lines=[line.document() for line in self.lines],
            gross_hkd=money(self.gross_hkd),
            subsidy_hkd=money(self.subsidy_hkd),
            net_hkd=money(self.net_hkd),
            subsidy_cap_remaining_hkd=(
                None
                if self.subsidy_cap_remaining_hkd is None
                else money(self.subsidy_cap_remaining_hkd)
            ),
            flags=list(self.flags),
            invoice_number=self.invoice_number,
            issued_on=self.issued_on,
            due_on=self.due_on,
        )


LineKey = tuple[str, Decimal | None, bool, str | None]  # (model, rate, subsidised, adjustment_for)


def line_key(hour: UsageHour, period: str, pricing: Pricing, project: Project | None) -> LineKey:
    """The invoice line of `period` an hour is charged on (docs/contracts.md §4)."""
    day, hour_period = day_and_period(hour.hour_start)
    return (
        hour.gpu_model,
        pricing.rate_for(hour.gpu_model, day),
        is_subsidised(project, day),
        None if hour_period == period else hour_period,
    )


def key_of_line(line: ComputedLine) -> LineKey:
    return (line.gpu_model, line.rate_hkd, line.subsidised, line.adjustment_for_period)


def line_sort_key(line: ComputedLine) -> tuple:
    # Regular lines first, then adjustments by period; within those by model, rate, subsidy.
    return (
        line.adjustment_for_period or "",
        line.gpu_model,
        line.rate_hkd is None,
        line.rate_hkd or Decimal(0),
        line.subsidised,
    )


def build_invoice(
    project_id: str,
    period: str,
    usage: Iterable[UsageHour],
    pricing: Pricing,
    subsidy_used_before: Decimal,
    status: str = "draft",
) -> ComputedInvoice:
    """One project's invoice for one period (docs/contracts.md §4).

    `usage` holds the hours invoiced here: hours of `period` itself, and late hours of finalized
    earlier periods, which become adjustment lines naming their own period.
    `subsidy_used_before` is the sum of the subsidy of the project's invoices of earlier periods.
    """
    project = pricing.projects.get(project_id)
    seconds_by_key: dict[LineKey, Decimal] = defaultdict(Decimal)
    for hour in usage:
        seconds_by_key[line_key(hour, period, pricing, project)] += hour.gpu_seconds

    lines = []
    for (gpu_model, rate, subsidised, adjustment_for_period), gpu_seconds in seconds_by_key.items():
        amount = (
            None
            if rate is None
            else round_half_up(Fraction(gpu_seconds) * Fraction(rate) / SECONDS_PER_HOUR, 2)
        )
        lines.append(
            ComputedLine(gpu_model, rate, subsidised, adjustment_for_period, gpu_seconds, amount)
        )
    lines.sort(key=line_sort_key)

    gross = sum((line.amount_hkd for line in lines if line.amount_hkd is not None), Decimal("0.00"))
    flags = []
    subsidy = Decimal("0.00")
    cap_remaining_after: Decimal | None = None
    if project is None:
        flags.append(FLAG_UNKNOWN_PROJECT)
    elif project.subsidy is not None:
        subsidised_amount = sum(
            (line.amount_hkd for line in lines if line.subsidised and line.amount_hkd is not None),
            Decimal("0.00"),
        )
        uncapped = round_half_up(Fraction(subsidised_amount) * Fraction(project.subsidy.rate), 2)
        cap_remaining = project.subsidy.cap_hkd - subsidy_used_before
        subsidy = min(uncapped, cap_remaining)
        if subsidy < uncapped:
            flags.append(FLAG_SUBSIDY_CAPPED)
        cap_remaining_after = cap_remaining - subsidy
    if any(line.rate_hkd is None for line in lines):
        flags.append(FLAG_UNPRICED_USAGE)

    return ComputedInvoice(
        invoice_id=invoice_id(period, project_id),
        project_id=project_id,
        period=period,
        status=status,
        lines=tuple(lines),
        gross_hkd=gross,
        subsidy_hkd=subsidy,
        net_hkd=gross - subsidy,
        subsidy_cap_remaining_hkd=cap_remaining_after,
        flags=tuple(flags),
    )


def assign_usage(
    unbilled: Iterable[UsageHour], finalized: frozenset[str] | set[str]
) -> dict[str, list[UsageHour]]:
    """Group not-yet-invoiced usage by the period of the invoice that carries it.

    Usage of an open period is invoiced in that period; usage of a finalized period (late usage,
    given as the part not already on a finalized invoice) goes to the next open period.
    """
    plan: dict[str, list[UsageHour]] = defaultdict(list)
    for hour in unbilled:
        period = day_and_period(hour.hour_start)[1]
        if period in finalized:
            period = invoice_period_for(period, finalized)
        plan[period].append(hour)
    return dict(plan)


# --- facts for the alerts service and the finalization watermark ---------------------------------

RATIO_PLACES = Decimal("0.000001")


def subsidy_used_ratio(used_hkd: Decimal, cap_hkd: Decimal) -> Decimal:
    """used / cap, truncated to 6 places so a ratio never reads 1 before the cap is reached; 0 for
    a zero cap."""
    if cap_hkd <= 0:
        return Decimal("0.000000")
    return (used_hkd / cap_hkd).quantize(RATIO_PLACES, rounding=ROUND_DOWN)


@dataclass(frozen=True)
class HourStatus:
    """Completeness of one hour with usage; `complete` None: metering has said nothing about it."""

    hour_start: dt.datetime
    complete: bool | None
    nodes_online: int | None = None
    nodes_through: int | None = None
    missing_nodes: tuple[str, ...] = ()


@dataclass(frozen=True)
class PeriodCompleteness:
    period: str
    hours: tuple[HourStatus, ...]

    @property
    def incomplete(self) -> list[HourStatus]:
        return [hour for hour in self.hours if hour.complete is False]

    @property
    def unknown(self) -> list[HourStatus]:
        return [hour for hour in self.hours if hour.complete is None]

    @property
    def complete_count(self) -> int:
        return sum(1 for hour in self.hours if hour.complete)

    @property
    def status(self) -> str:
        """incomplete (blocks finalization), unknown (some hours unreported), or complete."""
        if self.incomplete:
            return "incomplete"
        return "unknown" if self.unknown else "complete"


# --- credit notes --------------------------------------------------------------------------------


class CreditRefused(ValueError):
    """A credit note that cannot be issued as asked (the reason says why)."""


@dataclass(frozen=True)
class CreditPlan:
    """What a credit note credits: invoice lines by number (1-based), and its totals."""

    lines: tuple[tuple[int, ComputedLine], ...]
    gross_hkd: Decimal
    subsidy_hkd: Decimal
    net_hkd: Decimal


def plan_credit(
    invoice: ComputedInvoice,
    line_nos: Iterable[int] | None,
    already_credited: Iterable[int],
    subsidy_already_credited: Decimal,
    subsidy_rate: Decimal | None,
) -> CreditPlan:
    """Credit a finalized invoice in whole (`line_nos` None: every line not yet credited) or by
    lines. Each line is credited at most once, at its invoiced amount. The subsidy credited
    returns to the project's cap: once every line is credited, exactly what the invoice's subsidy
    has left; before that, the subsidised amount credited times the subsidy rate, rounded half up,
    never more than is left."""
    if invoice.status != "finalized":
        raise CreditRefused(
            f"invoice {invoice.invoice_id} is a draft: only a finalized invoice is credited"
        )
    numbered = dict(enumerate(invoice.lines, start=1))
    done = set(already_credited)
    if line_nos is None:
        wanted = sorted(set(numbered) - done)
        if not wanted:
            raise CreditRefused(f"every line of invoice {invoice.invoice_id} is already credited")
    else:
        wanted = sorted(set(line_nos))
        if not wanted:
            raise CreditRefused("lines: name at least one line, or leave lines out to credit all")
        unknown = [n for n in wanted if n not in numbered]
        if unknown:
            raise CreditRefused(
                f"invoice {invoice.invoice_id} has lines 1 to {len(numbered)}; no line"
                f" {', '.join(map(str, unknown))}"
            )
        repeated = [n for n in wanted if n in done]
        if repeated:
            raise CreditRefused(f"line(s) {', '.join(map(str, repeated))} already credited")
    lines = tuple((n, numbered[n]) for n in wanted)
    gross = sum((line.amount_hkd or Decimal(0) for _, line in lines), Decimal("0.00"))
    left = invoice.subsidy_hkd - subsidy_already_credited
    if done | set(wanted) == set(numbered):
        subsidy = left
    elif subsidy_rate is None:
        subsidy = Decimal("0.00")
    else:
        subsidised = sum(
            (line.amount_hkd or Decimal(0) for _, line in lines if line.subsidised),
            Decimal("0.00"),
        )
        subsidy = min(round_half_up(Fraction(subsidised) * Fraction(subsidy_rate), 2), left)
    return CreditPlan(lines, gross, subsidy, gross - subsidy)


# --- subsidy forecast ----------------------------------------------------------------------------

BURN_WINDOW_DAYS = 7


@dataclass(frozen=True)
class SubsidyForecast:
    """When a project's subsidy cap runs out at its trailing burn, beside when its approval ends.

    `burn_hkd_per_day`: the subsidy its usage of the last BURN_WINDOW_DAYS whole days (Hong Kong)
    would draw, per day, whole HKD; `exhausted_on`: the day the cap runs out at that burn (today
    when nothing is left), None when it does not run out before the approval ends or nothing
    burns; `days_left`: days from `today` to `exhausted_on`."""

    burn_hkd_per_day: Decimal
    exhausted_on: dt.date | None
    approval_ends_on: dt.date
    days_left: int | None


def subsidised_burn(
    usage: Iterable[tuple[str, dt.date, Decimal]],
    project: Project,
    pricing: Pricing,
    window_days: int = BURN_WINDOW_DAYS,
) -> Decimal:
    """The subsidy per day that (gpu_model, HK date, gpu_seconds) usage of a window draws: list
    price of its subsidised days times the subsidy rate, over the window's days (unrounded)."""
    subsidy = project.subsidy
    if subsidy is None:
        return Decimal(0)
    total = Fraction(0)
    for gpu_model, day, gpu_seconds in usage:
        rate = pricing.rate_for(gpu_model, day)
        if rate is not None and is_subsidised(project, day):
            total += Fraction(gpu_seconds) * Fraction(rate) / SECONDS_PER_HOUR
    per_day = total * Fraction(subsidy.rate) / window_days
    return Decimal(per_day.numerator) / Decimal(per_day.denominator)


def subsidy_forecast(
    cap_hkd: Decimal, used_hkd: Decimal, burn_per_day: Decimal, today: dt.date, valid_to: dt.date
) -> SubsidyForecast:
    remaining = cap_hkd - used_hkd
    burn = burn_per_day.quantize(Decimal(1), rounding=ROUND_HALF_UP)
    exhausted_on: dt.date | None
    if remaining <= 0:
        exhausted_on = today
    elif burn_per_day <= 0:
        exhausted_on = None
    else:
        days = (remaining / burn_per_day).to_integral_value(rounding=ROUND_CEILING)
        exhausted_on = today + dt.timedelta(days=int(days)) if days <= 36_500 else None
        if exhausted_on is not None and exhausted_on > valid_to:
            exhausted_on = None  # the approval ends first
    return SubsidyForecast(
        burn_hkd_per_day=burn,
        exhausted_on=exhausted_on,
        approval_ends_on=valid_to,
        days_left=None if exhausted_on is None else (exhausted_on - today).days,
    )


# --- per-job usage and efficiency ----------------------------------------------------------------

KWH_PLACES = Decimal("0.001")


@dataclass(frozen=True)
class JobDay:
    """One job's usage of one GPU model on one Hong Kong date (sums of its hourly totals)."""

    project_id: str
    job_id: str  # "" for an allocation with no job id
    gpu_model: str
    day: dt.date
    gpu_seconds: Decimal
    util_gpu_seconds: Decimal
    idle_gpu_seconds: Decimal
    energy_wh: Decimal
    nodes: int
    first_hour: dt.datetime
    last_hour: dt.datetime


@dataclass(frozen=True)
class UsageSummary:
    """GPU-hours, utilization, idle time, energy and list cost of a job or of a project's
    period. `list_cost_hkd` prices every GPU-hour at the rate card of its day (what the usage
    costs before any subsidy, rounded half up once); `idle_list_cost_hkd` the hours allocated at
    under 5% utilization; `unpriced_models` have no rate card and are in neither."""

    gpu_seconds: Decimal
    util_gpu_seconds: Decimal
    idle_gpu_seconds: Decimal
    energy_wh: Decimal
    list_cost_hkd: Decimal
    idle_list_cost_hkd: Decimal
    unpriced_models: tuple[str, ...]

    @property
    def gpu_hours(self) -> str:
        return gpu_hours_text(self.gpu_seconds)

    @property
    def idle_gpu_hours(self) -> str:
        return gpu_hours_text(self.idle_gpu_seconds)

    @property
    def mean_util_pct(self) -> Decimal | None:
        if not self.gpu_seconds:
            return None
        return (self.util_gpu_seconds * 100 / self.gpu_seconds).quantize(Decimal("0.1"))

    @property
    def energy_kwh(self) -> Decimal:
        return (self.energy_wh / 1000).quantize(KWH_PLACES, rounding=ROUND_HALF_UP)


def summarize(days: Iterable[JobDay], pricing: Pricing) -> UsageSummary:
    gpu = util = idle = energy = Decimal(0)
    cost = idle_cost = Fraction(0)
    unpriced: set[str] = set()
    for day in days:
        gpu += day.gpu_seconds
        util += day.util_gpu_seconds
        idle += day.idle_gpu_seconds
        energy += day.energy_wh
        rate = pricing.rate_for(day.gpu_model, day.day)
        if rate is None:
            unpriced.add(day.gpu_model)
            continue
        cost += Fraction(day.gpu_seconds) * Fraction(rate) / SECONDS_PER_HOUR
        idle_cost += Fraction(day.idle_gpu_seconds) * Fraction(rate) / SECONDS_PER_HOUR
    return UsageSummary(
        gpu,
        util,
        idle,
        energy,
        round_half_up(cost),
        round_half_up(idle_cost),
        tuple(sorted(unpriced)),
    )


@dataclass(frozen=True)
class JobUsage:
    project_id: str
    job_id: str
    gpu_models: tuple[str, ...]
    nodes: int  # the most nodes it ran on in one hour
    first_hour: dt.datetime
    last_hour: dt.datetime
    usage: UsageSummary


def jobs_of(days: Iterable[JobDay], pricing: Pricing) -> list[JobUsage]:
    """Per (project, job): its usage summary, the most expensive first."""
    grouped: dict[tuple[str, str], list[JobDay]] = defaultdict(list)
    for day in days:
        grouped[(day.project_id, day.job_id)].append(day)
    jobs = [
        JobUsage(
            project_id=project_id,
            job_id=job_id,
            gpu_models=tuple(sorted({d.gpu_model for d in found})),
            nodes=max(d.nodes for d in found),
            first_hour=min(d.first_hour for d in found),
            last_hour=max(d.last_hour for d in found),
            usage=summarize(found, pricing),
        )
        for (project_id, job_id), found in grouped.items()
    ]
    jobs.sort(key=lambda j: (-j.usage.list_cost_hkd, -j.usage.gpu_seconds, j.project_id, j.job_id))
    return jobs
