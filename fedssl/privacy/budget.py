"""A site's budget: calibrate once, charge before training, refuse when spent.

Order of a DP round at a site (write-ahead, so a crash can only over-count ε):
1. ``SiteBudget.open`` loads the accountant (rebuilding it from the signed ledger if the
   file was lost; refusing if neither agrees),
2. ``charge`` checks that the round fits the budget, appends a signed ``dp_event`` to the
   ledger and then the round's steps to the accountant file — both fsynced,
3. only then does training start and, later, anything leave the site.
A round that does not fit is refused: a ``refusal`` ledger record and a
``BudgetExhaustedError``. Nothing is ever trained without noise instead.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fedssl.config import PrivacyConfig
from fedssl.errors import BudgetExhaustedError, PrivacyError
from fedssl.privacy.accountant import AccountantState, load_accountant, save_accountant
from fedssl.privacy.analysis import noise_for_budget
from fedssl.privacy.ledger import Ledger
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


class SiteBudget:
    """The site's spend against its own ``privacy:`` settings (the operator's, never the server's)."""

    def __init__(self, state_dir: Path, spec: PrivacyConfig, state: AccountantState | None, ledger: Ledger) -> None:
        self.state_dir = Path(state_dir)
        self.spec = spec
        self.state = state
        self.ledger = ledger

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, state_dir: Path, spec: PrivacyConfig, key_path: Path | None = None) -> SiteBudget:
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        budget = cls(state_dir, spec, None, Ledger.open(state_dir, key_path=key_path))
        with exclusive(state_dir):
            budget._reload()
        return budget

    def _reload(self) -> None:
        """The spend as it is on disk now (called under :func:`exclusive`): another run on this state
        dir may have charged since this one last looked, and a stale history would let both overspend."""
        ledger_history = [e.event for e in dp_events(self.ledger.records())]
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

    def calibrate(self, sample_rate: float, planned_steps: int) -> Mechanism:
        """Fix σ for the whole planned run the first time this site trains (by any run: under the lock)."""
        with exclusive(self.state_dir):
            self._reload()
            return self.state.mechanism if self.state is not None else self._first_mechanism(sample_rate, planned_steps)

    def _first_mechanism(self, sample_rate: float, planned_steps: int) -> Mechanism:
        sigma = noise_for_budget(self.spec.target_epsilon, self.spec.delta, sample_rate, planned_steps, self.spec.accountant)
        mechanism = Mechanism(
            noise_multiplier=sigma,
            max_grad_norm=self.spec.max_grad_norm,
            delta=self.spec.delta,
            target_epsilon=self.spec.target_epsilon,
            accountant=self.spec.accountant,
            planned_steps=int(planned_steps),
            sample_rate=float(sample_rate),
        )
        self.state = AccountantState(mechanism=mechanism)
        self.ledger.append(BUDGET, mechanism.body())
        save_accountant(self.state_dir, self.state)
        return mechanism

    def charge(self, *, run_id: str, server_round: int, sample_rate: float, steps: int) -> Charge:
        """Record the round's steps before training; refuse (loudly) if they don't fit.

        Checked against the spend on disk, re-read under the site's exclusive budget lock: two runs
        training on one state dir at once take turns, and the second sees the first one's charge."""
        with exclusive(self.state_dir):
            self._reload()
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
            self.ledger.append(
                REFUSAL,
                {"run_id": run_id, "round": server_round, "reason": reason, "epsilon_spent": spent, "target_epsilon": mech.target_epsilon},
            )
            raise BudgetExhaustedError(f"site refuses to train: {reason}")
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
        return Charge(mech.noise_multiplier, float(sample_rate), int(steps), after, int(record["seq"]))


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
