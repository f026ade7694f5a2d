"""Pipelines: generation, and the stages other pipelines (caching, samples during training) share.

Each stage is a public function in a module of its own:

- ``config``: ``GenerateConfig``, ``Request``, ``GenerationResult`` (no torch at import);
- ``model_sources``: ``ModelSource``, ``FileModels``, ``PrebuiltDiT`` (an already-built DiT);
- ``plugin_setup``: ``resolve_quantizer``, ``resolve_generation_plugins`` (names -> objects, once);
- ``devices``: ``resolve_device``, ``resolve_compute_dtype``, ``measure_stage``, ``free_memory``;
- ``requests``: ``resolve_request``;
- ``text_encoding``: ``encode_texts``;
- ``conditioning``: ``read_request_images``, ``request_clip_features``, ``encode_conditioning``;
- ``dit_builder``: ``build_dit`` (quantization, LoRAs, offload, compile);
- ``denoising``: ``denoise_request``, ``initial_noise``;
- ``decoding``: ``decode_latents``;
- ``outputs``: ``output_base``, ``write_outputs``, ``request_metadata``;
- ``generate``: ``GenerationPipeline`` (the numbered steps) and ``generate()``.
"""
