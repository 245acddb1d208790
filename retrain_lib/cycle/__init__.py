"""One retraining cycle, stage by stage, as plain functions with typed results.

``trigger.check_new_data`` -> ``data.ingest`` -> ``data.tile_one`` (per scene) ->
``mining.mine`` -> ``data.assemble`` -> ``models.train_candidate`` (per candidate) ->
``models.evaluate_models`` -> ``models.register_and_promote`` -> ``report.write_report``;
``run.run_cycle`` runs them in order in one process, and ``detect`` serves the champion.
Each stage takes the object type's config, :class:`~retrain_lib.cycle.settings.CycleSettings`
and the earlier stages' results (:mod:`retrain_lib.cycle.results`), and is idempotent for a
given cycle id. The Airflow DAGs call the same functions, one task per stage.
"""
