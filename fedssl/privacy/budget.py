"""A site's budget: calibrate once, charge before training, refuse when spent.

Order of a DP round at a site (write-ahead, so a crash can only over-count ε):
1. ``SiteBudget.open`` loads the accountant (rebuilding it from the signed ledger if the
   file was lost; refusing if neither agrees) and checks the ledger against the site's signed
   high-water mark (fedssl.privacy.highwater): a state dir deleted or restored from an older
   copy is refused, not started again at ε = 0,
2. ``admit`` — the one entry training uses — re-reads all that under the site's lock, checks the
   round against the site's policy (fedssl.privacy.policy), fixes σ the first time, checks the
   per-run cap and the lifetime budget, then appends a signed ``dp_event`` to the ledger, the
   round's steps to the accountant file and raises the high-water mark — all fsynced,
3. only then does training start and, later, anything leave the site.
A round that does not fit is refused: a ``refusal`` ledger record naming the rule, a logged line
and a ``RefusedError`` (``BudgetExhaustedError`` for the lifetime budget). Nothing is ever
trained with less noise instead.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fedssl.privacy.settings import PrivacyConfig
from fedssl.errors import BudgetExhaustedError, PrivacyError, RefusedError
from fedssl.privacy.accountant import AccountantState, load_accountant, save_accountant
from fedssl.privacy.analysis import epsilon_of, noise_for_budget
from fedssl.privacy.highwater import (
    HighWaterMark,
    highwater_path,
    mark_of,
    missing_mark_message,
    read_mark,
    rollback_problem,
    rolled_back_message,
    write_mark,
)
from fedssl.privacy.ledger import LEDGER_FILE, Ledger, site_key_path
from fedssl.privacy.policy import Refusal, RoundRequest, check_noise, check_request, check_run_epsilon
from fedssl.privacy.records import BUDGET, DP_EVENT, RECOVERY, REFUSAL, DPEvent, Event, Mechanism, bodies, dp_events

log = logging.getLogger(__name__)

BUDGET_LOCK = "budget.lock"  # in the site's state dir: held from re-reading the spend to recording a charge

# ε comparisons tolerate float noise from the accountants' numerical optimisation only.
EPSILON_SLACK = 1e-9


@dataclass(frozen=True)
class Charge:
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_after: float
    ledger_seq: int
    mechanism: Mechanism


class SiteBudget:
    """The site's spend against its own ``privacy:`` settings (the operator's, never the server's)."""

    def __init__(self, state_dir: Path, spec: PrivacyConfig, state: AccountantState | None, ledger: Ledger, mark_path: Path) -> None:
        self.state_dir = Path(state_dir)
        self.spec = spec
        self.state = state
        self.ledger = ledger
        self.mark_path = mark_path  # the signed high-water mark, beside the ledger key
        self._mark: HighWaterMark | None = None

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, state_dir: Path, spec: PrivacyConfig, key_path: Path | None = None, mark_path: Path | None = None) -> SiteBudget:
        """``mark_path``: the high-water mark, by default beside the ledger key (outside the state dir when the key is)."""
        state_dir = Path(state_dir)
        mark_path = Path(mark_path) if mark_path is not None else highwater_path(site_key_path(state_dir, key_path))
        if not (state_dir / LEDGER_FILE).exists() and mark_path.exists():
            # Before Ledger.open, which would start a fresh ledger (and, by default, key) in the empty
            # state dir. Unverified on purpose: the key may have gone with the state dir, and a forged
            # mark can only make the site refuse.
            raise _rolled_back(state_dir, mark_path, "the ledger is gone, but a high-water mark says this site trained")
        state_dir.mkdir(parents=True, exist_ok=True)
        budget = cls(state_dir, spec, None, Ledger.open(state_dir, key_path=key_path), mark_path)
        with budget._locked():
            pass
        return budget

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Under the site's lock: the spend as on disk now, and the high-water mark raised after any write."""
        with exclusive(self.state_dir):
            self._reload()
            try:
                yield
            finally:
                self._raise_mark()

    def _reload(self) -> None:
        """The spend as it is on disk now (called under :func:`exclusive`): another run on this state
        dir may have charged since this one last looked, and a stale history would let both overspend."""
        records = self.ledger.records()
        self._mark = self._check_mark(records)
        ledger_history = [e.event for e in dp_events(records)]
        state = load_accountant(self.state_dir)
        if state is None and ledger_history:
            # The accountant file is gone but the signed write-ahead ledger is not: rebuild
            # from it rather than start again at ε = 0.
            mechanism = _ledger_mechanism(self.ledger)
            if mechanism is None:
                raise PrivacyError(
                    f"{self.state_dir}: ledger has DP events but no budget record; refusing to train. Restore accountant.json from backup"
                )
            state = AccountantState(mechanism=mechanism, history=list(ledger_history))
            save_accountant(self.state_dir, state)
            self.ledger.append(RECOVERY, {"reason": "accountant.json missing; rebuilt from ledger", "steps": state.steps})
            log.warning("%s: accountant.json was missing; rebuilt %d steps from the ledger", self.state_dir, state.steps)
        elif state is not None:
            state = _reconcile(self.state_dir, state, ledger_history, self.ledger)
        self.state = state
        if state is not None:
            self._check_spec_compatible()
        if self._mark is not None and (problem := rollback_problem(self._mark, records, self.epsilon_spent, EPSILON_SLACK)):
            raise _rolled_back(self.state_dir, self.mark_path, problem)

    def _check_mark(self, records: list[dict]) -> HighWaterMark | None:
        """The verified mark, if the ledger is not behind it (ε is checked once the spend is loaded)."""
        mark = read_mark(self.mark_path, self.ledger.signing_key.public_key())
        if mark is None:
            if dp_events(records):
                raise PrivacyError(missing_mark_message(self.state_dir, self.mark_path))
            return None
        if problem := rollback_problem(mark, records, None, EPSILON_SLACK):
            raise _rolled_back(self.state_dir, self.mark_path, problem)
        return mark

    def _raise_mark(self) -> None:
        mark = mark_of(self.ledger.records(), self.epsilon_spent)
        if mark is not None and mark != self._mark:
            write_mark(self.mark_path, self.ledger.signing_key, mark)
            self._mark = mark

    def _check_spec_compatible(self) -> None:
        assert self.state is not None
        mech = self.state.mechanism
        if abs(mech.delta - self.spec.delta) > 0:
            raise PrivacyError(
                f"privacy.delta: this site has already spent budget at delta={mech.delta:g}; "
                f"it cannot switch to {self.spec.delta:g}. Set privacy.delta back to {mech.delta:g}"
            )
        if mech.target_epsilon != self.spec.target_epsilon:
            self.ledger.append(
                BUDGET, {**mech.body(), "target_epsilon": self.spec.target_epsilon, "previous_target_epsilon": mech.target_epsilon}
            )
            mech.target_epsilon = self.spec.target_epsilon
            save_accountant(self.state_dir, self.state)

    # ------------------------------------------------------------------ queries

    @property
    def epsilon_spent(self) -> float:
        return 0.0 if self.state is None else self.state.epsilon()

    @property
    def steps_taken(self) -> int:
        return 0 if self.state is None else self.state.steps

    @property
    def noise_multiplier(self) -> float | None:
        return None if self.state is None else self.state.mechanism.noise_multiplier

    def epsilon_if(self, sample_rate: float, steps: int) -> float:
        assert self.state is not None
        return self.state.epsilon([(self.state.mechanism.noise_multiplier, sample_rate, steps)])

    # ------------------------------------------------------------------ charging

    def admit(self, request: RoundRequest) -> Charge:
        """The one way training spends budget: policy, σ, per-run cap and lifetime budget, then the charge.

        All under the site's lock, against the spend re-read from disk. A refused round leaves a
        ``refusal`` record naming the rule and raises :class:`RefusedError`; a plan refused before the
        site ever trained does not fix σ, so a hostile first plan cannot choose the site's noise."""
        with self._locked():
            run_events = [e for e in dp_events(self.ledger.records()) if e.run_id == request.run_id]
            refusal = check_request(self.spec, request, [e.round for e in run_events])
            mechanism = None
            if refusal is None:
                mechanism = self.state.mechanism if self.state is not None else self._first_mechanism(request.sample_rate, request.planned_steps)
                refusal = check_noise(self.spec, mechanism.noise_multiplier) or self._check_run_cap(request, run_events, mechanism)
            if refusal is not None:
                target = self.state.mechanism.target_epsilon if self.state is not None else self.spec.target_epsilon
                self._refuse(request.run_id, request.server_round, refusal, target, RefusedError)
            assert mechanism is not None
            if self.state is None:
                self._fix_mechanism(mechanism)
            return self._charge(run_id=request.run_id, server_round=request.server_round, sample_rate=request.sample_rate, steps=request.steps)

    def _check_run_cap(self, request: RoundRequest, run_events: list[DPEvent], mechanism: Mechanism) -> Refusal | None:
        history = [e.event for e in run_events] + [(mechanism.noise_multiplier, request.sample_rate, request.steps)]
        run_after = epsilon_of(history, mechanism.delta, mechanism.accountant)
        return check_run_epsilon(self.spec, request.run_id, run_after, EPSILON_SLACK)

    def _refuse(self, run_id: str, server_round: int, refusal: Refusal, target_epsilon: float, error: type[RefusedError]) -> None:
        spent = self.epsilon_spent
        self.ledger.append(
            REFUSAL,
            {"run_id": run_id, "round": server_round, "rule": refusal.rule, "reason": refusal.reason,
             "epsilon_spent": spent, "target_epsilon": target_epsilon},
        )
        log.error("%s: refused round %d of run %s: %s", self.state_dir, server_round, run_id, refusal)
        raise error(f"site refuses to train: {refusal}", refusal.rule)

    def calibrate(self, sample_rate: float, planned_steps: int) -> Mechanism:
        """Fix σ for the whole planned run the first time this site trains (by any run: under the lock).

        Without the policy checks of :meth:`admit`: for tools and tests that build a budget by hand."""
        with self._locked():
            if self.state is None:
                self._fix_mechanism(self._first_mechanism(sample_rate, planned_steps))
            return self.state.mechanism

    def _first_mechanism(self, sample_rate: float, planned_steps: int) -> Mechanism:
        """σ calibrated so the planned run spends the target; nothing is written until it is fixed."""
        sigma = noise_for_budget(self.spec.target_epsilon, self.spec.delta, sample_rate, planned_steps, self.spec.accountant)
        return Mechanism(
            noise_multiplier=sigma,
            max_grad_norm=self.spec.max_grad_norm,
            delta=self.spec.delta,
            target_epsilon=self.spec.target_epsilon,
            accountant=self.spec.accountant,
            planned_steps=int(planned_steps),
            sample_rate=float(sample_rate),
        )

    def _fix_mechanism(self, mechanism: Mechanism) -> None:
        self.state = AccountantState(mechanism=mechanism)
        self.ledger.append(BUDGET, mechanism.body())
        save_accountant(self.state_dir, self.state)

    def charge(self, *, run_id: str, server_round: int, sample_rate: float, steps: int) -> Charge:
        """Record the round's steps against the lifetime budget only; refuse (loudly) if they don't fit.

        Checked against the spend on disk, re-read under the site's exclusive budget lock: two runs
        training on one state dir at once take turns, and the second sees the first one's charge.
        Training goes through :meth:`admit`, which adds the site's policy."""
        with self._locked():
            return self._charge(run_id=run_id, server_round=server_round, sample_rate=sample_rate, steps=steps)

    def _charge(self, *, run_id: str, server_round: int, sample_rate: float, steps: int) -> Charge:
        if self.state is None:
            raise PrivacyError("charge() before calibrate(): the site has no mechanism yet")
        mech = self.state.mechanism
        spent = self.state.epsilon()
        after = self.epsilon_if(sample_rate, steps)
        if after > mech.target_epsilon * (1 + EPSILON_SLACK):
            reason = (
                f"budget exhausted: round {server_round} would raise epsilon from {spent:.3f} to {after:.3f}, "
                f"above the site's target {mech.target_epsilon:g} (delta={mech.delta:g})"
            )
            self._refuse(run_id, server_round, Refusal("privacy.target_epsilon", reason), mech.target_epsilon, BudgetExhaustedError)
        event = DPEvent(
            run_id=run_id,
            round=server_round,
            steps=int(steps),
            sample_rate=float(sample_rate),
            noise_multiplier=mech.noise_multiplier,
            max_grad_norm=mech.max_grad_norm,
            delta=mech.delta,
            accountant=mech.accountant,
            epsilon_after=after,
            target_epsilon=mech.target_epsilon,
        )
        # The ledger first: it is the write-ahead log accountant.json is checked against and
        # rebuilt from. A crash between the two writes then leaves accountant.json one event
        # behind, which ``open`` replays from the ledger. The other order left the ledger behind
        # for good, and a later rebuild from it under-counted the crashed round.
        record = self.ledger.append(DP_EVENT, event.body())
        self.state.history.append(event.event)
        save_accountant(self.state_dir, self.state)
        return Charge(mech.noise_multiplier, float(sample_rate), int(steps), after, int(record["seq"]), mech)


def _rolled_back(state_dir: Path, mark_path: Path, problem: str | None) -> PrivacyError:
    return PrivacyError(rolled_back_message(state_dir, mark_path, problem or "behind its high-water mark"))


@contextmanager
def exclusive(state_dir: Path) -> Iterator[None]:
    """The site's budget lock: one process at a time reads, checks and changes this state dir's spend."""
    with open(Path(state_dir) / BUDGET_LOCK, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _ledger_mechanism(ledger: Ledger) -> Mechanism | None:
    """The mechanism of the first budget record, under the latest target the operator set."""
    budgets = bodies(ledger.records(), BUDGET)
    if not budgets:
        return None
    mechanism = Mechanism.from_body(budgets[0])
    mechanism.target_epsilon = float(budgets[-1]["target_epsilon"])
    return mechanism


def _reconcile(state_dir: Path, state: AccountantState, ledger_history: list[Event], ledger: Ledger) -> AccountantState:
    """Accountant file and ledger must tell one story; the longer one wins (over-count, never under)."""
    ours = state.history
    if ours == ledger_history[: len(ours)] and len(ledger_history) > len(ours):
        state.history = list(ledger_history)
        save_accountant(state_dir, state)
        ledger.append("recovery", {"reason": "accountant.json behind the ledger; replayed ledger events", "steps": state.steps})
        return state
    if ledger_history == ours:
        return state
    if ledger_history == ours[: len(ledger_history)]:
        # The ledger is written first, so the accountant file can only be ahead of it by
        # tampering (or a pre-write-ahead state dir): refuse rather than trust it.
        raise PrivacyError(
            f"{state_dir}: accountant.json records {len(ours) - len(ledger_history)} DP event(s) the signed ledger lacks; "
            "refusing to train. Run `fedssl audit` on this directory and restore the state from backup"
        )
    raise PrivacyError(
        f"{state_dir}: accountant.json and ledger.jsonl disagree on the DP history; refusing to train. "
        "Run `fedssl audit` on this directory to find the tampered or corrupted file"
    )
