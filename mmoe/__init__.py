"""mmoe: multimodal Mixture-of-Experts vision-language models.

Layout (dependencies point one way, top to bottom):
  mmoe.model.moe   routing, experts, dispatch, balancing, routing health (the one home of MoE logic)
  mmoe.model       vision encoder, connector, decoder, VLM (plain nn.Modules, no training code)
  mmoe.interop     loading Hugging Face / timm / open_clip checkpoints from local paths
  mmoe.data        synthetic + LLaVA-style data, chat template, collate, DataModule
  mmoe.metrics     official VQA accuracy, COCO caption metrics, GQA / POPE
  mmoe.training    LightningModule, optimisation, callbacks, export
  mmoe.parallel    expert parallelism on torch.distributed
"""

__version__ = "0.1.0"
