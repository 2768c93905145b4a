"""Inference without the training stack: load an export, answer questions, draw routing maps.

`pipeline` (load_model / load_pipeline / VLMPipeline), `cli` (``python -m mmoe.inference`` or ``mmoe-infer``),
`routing_map` (which expert each image patch and generated token took), `lmms_plugin` (the lmms-eval model
``mmoe``, registered by the ``lmms_eval.models`` entry point).
"""

_PIPELINE = ("VLMPipeline", "load_model", "load_pipeline")


def __getattr__(name: str):
    # lazy, so `mmoe-infer --help` and error messages come back before torch and the model are imported
    if name in _PIPELINE:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'mmoe.inference' has no attribute {name!r}")


__all__ = list(_PIPELINE)
