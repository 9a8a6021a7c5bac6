"""The one calibration engine: target selection and model checks (``targets``), the block walker (``walker``),
statistics hooks (``stats``), accelerate offload (``offload``), resumable checkpoints (``checkpoint``), the run
skeleton (``run``) and the report (``report``). It never imports a method or an artifact writer."""
