"""MLflow model registry: register every candidate, gate promotion, move the champion alias.

Each object type has one registered model (``autoretrain-<type>`` unless configured). Every
trained candidate becomes a version of it whose source is its training run's artifact root,
so ``models:/<name>@champion`` downloads ``weights/best.pt``. The ``champion`` alias is the
only promotion mechanism (stages are deprecated in MLflow). Every decision is written onto the
version as tags, in numbers, so the registry alone explains why a model is or is not champion.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from retrain_lib.core.config import PromotionConfig
from retrain_lib.core.errors import ConfigError, RetrainError
from retrain_lib.stages.mlflow_server import mlflow_client, mlflow_errors
from retrain_lib.stages.weights import WEIGHTS_SHA256_TAG

__all__ = [
    "ALIAS_LOG_PREFIX",
    "CHAMPION_ALIAS",
    "AliasChange",
    "Candidate",
    "GateDecision",
    "ModelRegistry",
    "ModelVersionInfo",
    "PromotionOutcome",
    "decide_promotion",
]

CHAMPION_ALIAS = "champion"
ALIAS_LOG_PREFIX = "alias_change."
"""Registered-model tags ``alias_change.<epoch ms>.v<version>.<action>``: every move of the
champion alias, kept (``last_alias_change`` holds only the latest)."""
METRIC_TAG_PREFIX = "test."


@dataclass(frozen=True)
class GateDecision:
    """Whether one challenger may replace the champion, and why, in numbers."""

    promote: bool
    reason: str
    primary_metric: str
    challenger_primary: float
    champion_primary: float | None
    guard_deltas: Mapping[str, float] = field(default_factory=dict)

    @property
    def primary_delta(self) -> float | None:
        """Gain of the primary metric over the champion (None for a first model)."""
        if self.champion_primary is None:
            return None
        return self.challenger_primary - self.champion_primary


def _metric(metrics: Mapping[str, Any], name: str, who: str) -> float:
    value = metrics.get(name)
    if value is None or not isinstance(value, int | float) or math.isnan(float(value)):
        raise RetrainError(f"{who} has no usable '{name}' metric (got {value!r}); evaluate it "
                           "on the frozen test set first")
    return float(value)


def decide_promotion(challenger: Mapping[str, Any], champion: Mapping[str, Any] | None,
                     rule: PromotionConfig) -> GateDecision:
    """Apply the promotion gate to one challenger.

    Both metric sets must come from the same frozen test scenes, evaluated in the same cycle.
    A first model (no champion) must reach ``rule.absolute_floor``. Otherwise the primary metric
    must improve by at least ``rule.min_improvement`` and no guard may drop by more than its
    tolerance.
    """
    primary = rule.primary_metric
    value = _metric(challenger, primary, "the challenger")
    if champion is None:
        if value >= rule.absolute_floor:
            return GateDecision(True, f"first model: {primary} {value:.4f} >= floor "
                                f"{rule.absolute_floor:.4f}", primary, value, None)
        return GateDecision(False, f"first model below the floor: {primary} {value:.4f} < "
                            f"{rule.absolute_floor:.4f}", primary, value, None)
    base = _metric(champion, primary, "the champion")
    gain = value - base
    guard_deltas: dict[str, float] = {
        g.metric: _metric(challenger, g.metric, "the challenger")
        - _metric(champion, g.metric, "the champion") for g in rule.guards}
    # Tiny epsilon so that a gain exactly equal to the threshold passes despite float noise.
    if gain + 1e-12 < rule.min_improvement:
        return GateDecision(False, f"{primary} {value:.4f} vs champion {base:.4f}: gain "
                            f"{gain:+.4f} < required {rule.min_improvement:.4f}",
                            primary, value, base, guard_deltas)
    broken = [f"{g.metric} dropped {-guard_deltas[g.metric]:.4f} > tolerance {g.tolerance:.4f}"
              for g in rule.guards if -guard_deltas[g.metric] > g.tolerance + 1e-12]
    if broken:
        return GateDecision(False, f"{primary} gain {gain:+.4f} but guard broken: "
                            + "; ".join(broken), primary, value, base, guard_deltas)
    return GateDecision(True, f"{primary} {value:.4f} vs champion {base:.4f}: gain {gain:+.4f} "
                        f">= {rule.min_improvement:.4f}, guards hold", primary, value, base,
                        guard_deltas)


@dataclass(frozen=True)
class Candidate:
    """A registered challenger and its metrics on this cycle's frozen test set."""

    version: str
    metrics: Mapping[str, Any]


@dataclass(frozen=True)
class PromotionOutcome:
    """What promotion decided for a cycle."""

    promoted_version: str | None
    previous_champion: str | None
    decisions: Mapping[str, GateDecision]

    @property
    def promoted(self) -> bool:
        """Whether the champion alias moved."""
        return self.promoted_version is not None


@dataclass(frozen=True)
class ModelVersionInfo:
    """One registered version as `autoretrain models` shows it."""

    version: str
    run_id: str | None
    aliases: tuple[str, ...]
    status: str
    tags: Mapping[str, str]
    created: datetime

    @property
    def metrics(self) -> dict[str, float]:
        """Frozen-test-set metrics recorded at registration."""
        out = {}
        for key, value in self.tags.items():
            if key.startswith(METRIC_TAG_PREFIX):
                try:
                    out[key[len(METRIC_TAG_PREFIX):]] = float(value)
                except ValueError:
                    continue
        return out

    @property
    def parent(self) -> str | None:
        """The version this one was fine-tuned from."""
        return self.tags.get("parent_version") or None


@dataclass(frozen=True)
class AliasChange:
    """One move of the champion alias, as the registered model's tags record it."""

    version: str
    action: str
    """``promoted`` or ``rolled_back``."""
    at: str
    reason: str
    replaced_version: str


def _alias_log_key(change: AliasChange) -> str:
    epoch_ms = round(datetime.fromisoformat(change.at).timestamp() * 1000)
    return f"{ALIAS_LOG_PREFIX}{epoch_ms:013d}.v{change.version}.{change.action}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, str]:
    return {f"{METRIC_TAG_PREFIX}{k}": f"{float(v):.6f}" for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
            and not math.isnan(float(v))}


class ModelRegistry:
    """The registered model of one object type in an MLflow tracking server or database.

    Every call names the server and the operation when MLflow does not answer
    (:class:`~retrain_lib.core.errors.RegistryUnavailable`); only a model or alias that does
    not exist reads as "none yet".
    """

    def __init__(self, model_name: str, tracking_uri: str | None = None) -> None:
        self.model_name = model_name
        self.client, self.tracking_uri = mlflow_client(tracking_uri)

    @contextmanager
    def _calling(self, operation: str) -> Iterator[None]:
        with mlflow_errors(f"{operation} of model {self.model_name!r}", self.tracking_uri):
            yield

    # -- reading -------------------------------------------------------------------------

    def _ensure_model(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            with self._calling("reading the registered model"):
                self.client.get_registered_model(self.model_name)
        except MlflowException:  # not found: anything else became RegistryUnavailable
            with self._calling("creating the registered model"):
                self.client.create_registered_model(
                    self.model_name, description="AutoRetrain detector; the 'champion' alias "
                    "marks the model in service.")

    def _info(self, mv: Any) -> ModelVersionInfo:
        return ModelVersionInfo(
            version=str(mv.version), run_id=mv.run_id, aliases=tuple(mv.aliases or ()),
            status=str(mv.status), tags=dict(mv.tags or {}),
            created=datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC))

    def get_version(self, version: str | int) -> ModelVersionInfo:
        """One version; RetrainError naming the model if it does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            with self._calling(f"reading version {version}"):
                return self._info(self.client.get_model_version(self.model_name, str(version)))
        except MlflowException:
            known = ", ".join(v.version for v in self.list_versions()) or "none"
            raise RetrainError(f"model {self.model_name!r} has no version {version}; "
                               f"versions: {known}") from None

    def champion(self) -> ModelVersionInfo | None:
        """The version holding the champion alias, or None before the first promotion.

        Raises:
            RegistryUnavailable: MLflow did not answer (never read as "no champion").
        """
        from mlflow.exceptions import MlflowException

        try:
            with self._calling("looking up the champion"):
                return self._info(self.client.get_model_version_by_alias(self.model_name,
                                                                         CHAMPION_ALIAS))
        except MlflowException:  # no such model or alias: no champion yet
            return None

    def list_versions(self) -> list[ModelVersionInfo]:
        """All versions, oldest first, with aliases, metrics and lineage tags."""
        from mlflow.exceptions import MlflowException

        # Search results carry the tags but not the aliases: those come from the model, in one
        # call (not one call per version: 200 versions over HTTP took seconds).
        found: list[Any] = []
        token = None
        with self._calling("listing the versions"):
            while True:
                page = self.client.search_model_versions(f"name = '{self.model_name}'",
                                                         page_token=token)
                found += list(page)
                token = getattr(page, "token", None)
                if not token:
                    break
        if not found:
            return []
        try:
            with self._calling("reading the aliases"):
                aliases = dict(self.client.get_registered_model(self.model_name).aliases or {})
        except MlflowException:  # deleted in between: no aliases
            aliases = {}
        by_version: dict[str, list[str]] = {}
        for alias, version in aliases.items():
            by_version.setdefault(str(version), []).append(alias)
        return sorted((replace(self._info(v), aliases=tuple(sorted(by_version.get(
            str(v.version), ())))) for v in found), key=lambda i: int(i.version))

    def model_uri(self, alias: str = CHAMPION_ALIAS) -> str:
        """``models:/<name>@<alias>``: what inference loads."""
        return f"models:/{self.model_name}@{alias}"

    # -- writing -------------------------------------------------------------------------

    def register_candidate(self, run_id: str, *, metrics: Mapping[str, Any] | None = None,
                           dataset_version: str = "", parent_version: str | None = None,
                           cycle_id: str = "", code_version: str = "",
                           candidate: str = "", extra_tags: Mapping[str, str] | None = None,
                           ) -> str:
        """Register a training run as a new version; returns the version number.

        The version's source is the run's artifact root, so its ``weights/best.pt`` is what
        ``models:/<name>@<alias>`` resolves to. Idempotent per run: registering the same run
        again returns the existing version instead of creating a duplicate.
        """
        from mlflow.exceptions import MlflowException

        self._ensure_model()
        with self._calling("searching the versions"):
            existing = [v for v in self.client.search_model_versions(
                f"name = '{self.model_name}'") if v.run_id == run_id]
        if existing:
            if metrics:
                self.record_metrics(existing[0].version, metrics)
            return str(existing[0].version)
        try:
            with self._calling(f"reading training run {run_id}"):
                run = self.client.get_run(run_id)
        except MlflowException:
            raise RetrainError(f"MLflow run {run_id} not found at {self.tracking_uri}; the "
                               "training step must log one run per candidate") from None
        tags = {
            "dataset_version": dataset_version,
            "parent_version": parent_version or "",
            "cycle_id": cycle_id,
            "code_version": code_version,
            "candidate": candidate,
            "registered_at": _now(),
            WEIGHTS_SHA256_TAG: (run.data.tags or {}).get(WEIGHTS_SHA256_TAG, ""),
            **_scalar_metrics(metrics or {}),
            **dict(extra_tags or {}),
        }
        with self._calling(f"registering run {run_id}"):
            mv = self.client.create_model_version(
                self.model_name, source=run.info.artifact_uri, run_id=run_id,
                tags={k: str(v) for k, v in tags.items()},
                description=f"cycle {cycle_id or '-'}, candidate {candidate or '-'}, dataset "
                            f"{dataset_version or '-'}")
        return str(mv.version)

    def record_metrics(self, version: str, metrics: Mapping[str, Any]) -> None:
        """Write frozen-test-set metrics onto a version's tags."""
        self._tag(version, _scalar_metrics(metrics))

    def _tag(self, version: str, tags: Mapping[str, str]) -> None:
        with self._calling(f"tagging version {version}"):
            for key, value in tags.items():
                self.client.set_model_version_tag(self.model_name, str(version), key,
                                                  str(value))

    def champion_for_cycle(self, cycle_id: str) -> ModelVersionInfo | None:
        """The champion a cycle is measured against: the current one, unless this cycle's own
        promotion has already moved the alias (a rerun after a crash, or of a finished cycle):
        then the version that promotion replaced (None if it was the first)."""
        current = self.champion()
        if (current is None or not cycle_id or current.tags.get("cycle_id") != cycle_id
                or current.tags.get("decision") != "promoted"):
            return current
        replaced = current.tags.get("replaced_version", "")
        return self.get_version(replaced) if replaced else None

    def _log_alias_change(self, change: AliasChange) -> None:
        with self._calling("recording the alias change"):
            self.client.set_registered_model_tag(
                self.model_name, _alias_log_key(change), json.dumps({
                    "version": change.version, "action": change.action, "at": change.at,
                    "reason": change.reason, "replaced_version": change.replaced_version}))

    def alias_changes(self) -> list[AliasChange]:
        """Every recorded move of the champion alias, oldest first (empty before the first,
        or for moves made before the log was kept)."""
        from mlflow.exceptions import MlflowException

        try:
            with self._calling("reading the alias changes"):
                tags = dict(self.client.get_registered_model(self.model_name).tags or {})
        except MlflowException:  # no such model yet
            return []
        changes = []
        for key in sorted(k for k in tags if k.startswith(ALIAS_LOG_PREFIX)):
            try:
                doc = json.loads(tags[key])
                changes.append(AliasChange(str(doc["version"]), str(doc["action"]),
                                           str(doc["at"]), str(doc.get("reason", "")),
                                           str(doc.get("replaced_version", ""))))
            except (ValueError, KeyError, TypeError):
                continue
        return changes

    def _move_champion(self, version: str, reason: str, action: str) -> str | None:
        previous = self.champion()
        # Milliseconds: two moves within a second are two entries of the log.
        at = datetime.now(UTC).isoformat(timespec="milliseconds")
        # The decision is tagged (and logged) before the alias moves: a run killed in between
        # leaves a version that says what was decided and what it replaces, so a rerun can
        # finish.
        self._tag(version, {"decision": action, "decision_reason": reason,
                            f"{action}_at": at,
                            "replaced_version": previous.version if previous else ""})
        self._log_alias_change(AliasChange(version, action, at, reason,
                                           previous.version if previous else ""))
        with self._calling(f"moving the champion alias to version {version}"):
            self.client.set_registered_model_alias(self.model_name, CHAMPION_ALIAS,
                                                   str(version))
        with self._calling("recording the alias change"):
            self.client.set_registered_model_tag(
                self.model_name, "last_alias_change",
                f"{_now()} {action} v{version} (was "
                f"{previous.version if previous else 'none'}): {reason}")
        return previous.version if previous else None
    def promote_if_better(self, candidates: Sequence[Candidate],
                          champion_metrics: Mapping[str, Any] | None,
                          rule: PromotionConfig) -> PromotionOutcome:
        """Gate every challenger against the champion; move the alias to the best that passes.

        ``champion_metrics`` must be the champion re-evaluated on this cycle's frozen test
        set (never its old numbers); None means there is no champion yet. Versions that lose
        are tagged ``decision=rejected`` with the reason in numbers.
        """
        current = self.champion()
        if current is not None and champion_metrics is None:
            raise RetrainError(f"{self.model_name} has champion v{current.version}; re-evaluate "
                               "it on this cycle's frozen test set before gating challengers")
        if current is not None:
            self.record_metrics(current.version, champion_metrics or {})
        decisions = {c.version: decide_promotion(c.metrics, champion_metrics, rule)
                     for c in candidates}
        passing = [c for c in candidates if decisions[c.version].promote]
        winner = max(passing, key=lambda c: (decisions[c.version].challenger_primary,
                                             -int(c.version)), default=None)
        final: dict[str, GateDecision] = {}
        for cand in candidates:
            self.record_metrics(cand.version, cand.metrics)
            decision = decisions[cand.version]
            if winner is not None and cand.version == winner.version:
                final[cand.version] = decision
                continue
            if decision.promote:  # passed the gate, lost to a better challenger
                decision = replace(decision, promote=False, reason=(
                    f"passed the gate but v{winner.version if winner else '?'} scored higher "
                    f"({decision.challenger_primary:.4f})"))
            final[cand.version] = decision
            self._tag(cand.version, {"decision": "rejected", "decision_reason": decision.reason})
        previous = None
        if winner is not None:
            previous = self._move_champion(winner.version, decisions[winner.version].reason,
                                           "promoted")
        return PromotionOutcome(winner.version if winner else None,
                                previous if winner else (current.version if current else None),
                                final)

    def finish_promotion(self, version: str) -> None:
        """Move the alias to ``version``, already tagged ``decision=promoted`` by a run that
        was stopped before it moved the alias."""
        info = self.get_version(version)
        current = self.champion()
        if current is not None and current.version == info.version:
            return
        expected = info.tags.get("replaced_version", "")
        if (current.version if current else "") != expected:
            raise RetrainError(
                f"{self.model_name}: v{info.version} was promoted over "
                f"{'v' + expected if expected else 'no champion'}, but the champion is now "
                f"{'v' + current.version if current else 'none'}; check the alias by hand "
                "(autoretrain models) before re-running the cycle")
        if info.tags.get("promoted_at"):  # the same log entry, if the stopped run wrote it
            self._log_alias_change(AliasChange(info.version, "promoted",
                                               info.tags["promoted_at"],
                                               info.tags.get("decision_reason", ""), expected))
        with self._calling(f"moving the champion alias to version {info.version}"):
            self.client.set_registered_model_alias(self.model_name, CHAMPION_ALIAS,
                                                   info.version)

    def set_champion(self, version: str | int, reason: str, *, action: str = "promoted"
                     ) -> str | None:
        """Move the alias by hand (``autoretrain promote`` / ``rollback``); returns the old one."""
        if not reason.strip():
            raise ConfigError("a reason is required when moving the champion alias by hand")
        info = self.get_version(version)
        return self._move_champion(info.version, f"manual: {reason}", action)

    def rollback(self, to_version: str | int, reason: str) -> str | None:
        """Point the champion alias back at an earlier version."""
        return self.set_champion(to_version, reason, action="rolled_back")
