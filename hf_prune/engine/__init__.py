"""The one calibration engine: target selection and model checks (``targets``), the block walker (``walker``),
statistics hooks (``stats``), accelerate offload (``offload``), resumable checkpoints (``checkpoint``), the run
skeleton (``run``), the report (``report``) and data-parallel calibration across processes (``distributed``). It never imports a method or an artifact writer."""
