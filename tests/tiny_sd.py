"""Tiny SD1.5- and SDXL-style pipelines built from configs with random weights,
saved with save_pretrained, so tests run the real diffusers/transformers loading
code without any download."""
import os

import torch


def _tiny_clip_tokenizer(folder=None):
    """The synthetic CLIP tokenizer at its smallest vocabulary (92 tokens)."""
    import common as C
    return C.synthetic_clip_tokenizer(92)


def _text_encoder(tok, with_projection=False, hidden=32, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=77, projection_dim=32,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def _vae(seed=0, scaling_factor=0.18215, force_upcast=True):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                         layers_per_block=1, sample_size=16, scaling_factor=scaling_factor, force_upcast=force_upcast)


def _scheduler():
    import common as C
    return C.sd_scheduler()


def make_tiny_sd15(folder, seed=0, channels=(32, 64)):
    """SD1.5 layout: unet, vae, text_encoder, tokenizer, scheduler. Latents 4x8x8 at
    resolution 16. Wider `channels` give a medium U-Net for benchmarks, e.g.
    python -c "import sys; sys.path.insert(0, 'tests'); import tiny_sd; tiny_sd.make_tiny_sd15('runs/medium_sd15', channels=(128, 256))" """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    tok = _tiny_clip_tokenizer(os.path.join(folder, "_tok"))
    te = _text_encoder(tok, seed=seed)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=tuple(channels),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    pipe = StableDiffusionPipeline(vae=_vae(seed), text_encoder=te, tokenizer=tok, unet=unet, scheduler=_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return pipe


def make_tiny_sdxl(folder, seed=0):
    """SDXL layout: two text encoders (the second with projection), pooled
    embedding and add_time_ids (text_time). Latents 4x8x8 at resolution 16."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    tok = _tiny_clip_tokenizer(os.path.join(folder, "_tok"))
    te1 = _text_encoder(tok, seed=seed)
    te2 = _text_encoder(tok, with_projection=True, seed=seed + 2)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=8, norm_num_groups=8, transformer_layers_per_block=1,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=6 * 8 + 32, use_linear_projection=True)
    pipe = StableDiffusionXLPipeline(vae=_vae(seed, scaling_factor=0.13025), text_encoder=te1, text_encoder_2=te2,
                                     tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=_scheduler())
    pipe.save_pretrained(folder)
    return pipe
