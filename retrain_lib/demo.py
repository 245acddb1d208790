"""The demo behind ``make demo``: embedded defaults, synthetic data, the stages that exist.

It validates the shipped object-type configs, drops synthetic scenes of region A (vegetated)
for one object type into ``<root>/storage/incoming/<type>/``, ingests them into the catalog
(with one deliberately broken drop that goes to quarantine), and says what it made and where.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrain_lib.config import ObjectTypeConfig, load_object_type_configs
from retrain_lib.errors import ConfigError
from retrain_lib.ingest import IngestReport, ingest_drops
from retrain_lib.storage import LocalStorage, join_key

__all__ = ["DemoResult", "run_demo"]


@dataclass(frozen=True)
class DemoResult:
    """What the demo made."""

    root: Path
    storage_root: Path
    configs: dict[str, ObjectTypeConfig]
    object_type: str
    drops: list[dict[str, Any]] = field(default_factory=list)
    ingest: IngestReport | None = None


def _write_drop(folder: Path, cfg: ObjectTypeConfig, drop_id: str, region: str, scenes: int,
                size: int, seed: int) -> list[dict[str, Any]]:
    import json

    from retrain_lib.synthetic import SceneSpec, make_drop

    specs = [SceneSpec(scene_id=f"scene{i:02d}", width=size, height=size,
                       classes=tuple(cfg.classes), region=region,  # type: ignore[arg-type]
                       objects_per_class=max(4, size // 128), decoys=max(2, size // 256),
                       seed=seed * 1000 + i) for i in range(scenes)]
    made = make_drop(folder, specs)
    (folder / "drop.json").write_text(json.dumps({"region": region, "source": "synthetic demo"}))
    return [{"drop": drop_id, "scene": s.path.name, "size": f"{size}x{size}",
             "region": region, **s.counts()} for s in made]


def run_demo(root: str | Path, *, configs_dir: str | Path = "configs/object_types",
             object_type: str = "vehicle", scenes: int = 2, size: int = 1024, seed: int = 0,
             log: Callable[[str], None] = print) -> DemoResult:
    """Run the demo under ``root`` (created if missing); safe to run again."""
    root = Path(root).resolve()
    configs = load_object_type_configs(configs_dir)
    if object_type not in configs:
        raise ConfigError(f"{configs_dir}: no config for object type {object_type!r}; have "
                          f"{', '.join(sorted(configs))}")
    cfg = configs[object_type]
    log(f"validated {len(configs)} object-type config(s): {', '.join(sorted(configs))}")
    storage_root = root / "storage"
    storage = LocalStorage(storage_root)
    incoming = storage_root / "incoming" / cfg.name
    drops: list[dict[str, Any]] = []
    drop_id = f"demo-a-seed{seed}"
    log(f"writing {scenes} synthetic scene(s) of region A (vegetated) into {incoming}")
    drops += _write_drop(incoming / drop_id, cfg, drop_id, "vegetated", scenes, size, seed)
    # An analyst's mistake: a scene without its annotations, which ingest must quarantine.
    broken_id = f"demo-broken-seed{seed}"
    drops += _write_drop(incoming / broken_id, cfg, broken_id, "vegetated", 1, 256, seed + 7)
    (incoming / broken_id / "scene00.geojson").unlink()
    log("ingesting the drops: validate, catalog the good ones, quarantine the bad one")
    report = ingest_drops(storage, cfg, cycle_id="demo")
    storage.put_json(join_key("cycles", cfg.name, "demo", "ingest.json"), report.to_dict())
    return DemoResult(root, storage_root, configs, cfg.name, drops, report)
