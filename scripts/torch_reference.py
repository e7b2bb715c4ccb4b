"""A PyTorch UniAlignment train step written the release's way, for scripts/bench_train.py.

diffusers' `JointTransformerBlock`s with the UniAlignment heads (all blocks full, timestep
embedding rounded to fp16, image / text heads, mid-layer adapters), transformers' T5
encoder and diffusers' VAE (both frozen), and the release's losses in eager mode: flow
matching with logit-normal timesteps and null-prompt dropout, SUBS masked diffusion on the
caption, contrastive and alignment; then clipping and AdamW. Same sizes as our step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class UniAlignmentTorch(nn.Module):
    def __init__(self, tcfg, sample_size: int):
        from diffusers.models.attention import JointTransformerBlock
        from diffusers.models.embeddings import PatchEmbed, TimestepEmbedding, Timesteps
        from diffusers.models.normalization import AdaLayerNormContinuous

        super().__init__()
        w, p = tcfg.width, tcfg.patch_size
        self.patch, self.out_channels = p, tcfg.out_channels
        self.pos_embed = PatchEmbed(height=sample_size, width=sample_size, patch_size=p,
                                    in_channels=tcfg.in_channels, embed_dim=w,
                                    pos_embed_max_size=tcfg.pos_embed_max_size)
        self.time_proj = Timesteps(tcfg.timestep_channels, flip_sin_to_cos=True,
                                   downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(tcfg.timestep_channels, w)
        self.context_embedder = nn.Linear(tcfg.joint_attention_dim, w)
        self.blocks = nn.ModuleList([
            JointTransformerBlock(dim=w, num_attention_heads=tcfg.num_heads,
                                  attention_head_dim=tcfg.head_dim, context_pre_only=False)
            for _ in range(tcfg.num_layers)])
        self.image_norm_out = AdaLayerNormContinuous(w, w, elementwise_affine=False, eps=1e-6)
        self.image_proj_out = nn.Linear(w, p * p * tcfg.out_channels)
        self.text_norm_out = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.text_proj_out = nn.Linear(w, tcfg.vocab_size)
        adapter = lambda: nn.Sequential(  # noqa: E731
            nn.Linear(w, tcfg.adapter_hidden_dim), nn.SiLU(),
            nn.Linear(tcfg.adapter_hidden_dim, tcfg.teacher_dim), nn.SiLU())
        self.adapter_img, self.adapter_text = adapter(), adapter()

    def forward(self, latents, timestep, context, conditions=(), block_depth=1):
        h, w = latents.shape[-2:]
        x = torch.cat([self.pos_embed(z) for z in (latents, *conditions)], dim=1)
        n_target = x.shape[1] // (1 + len(conditions))
        temb = self.time_embed(self.time_proj(timestep).to(torch.float16).to(x.dtype))
        c = self.context_embedder(context)
        for i, block in enumerate(self.blocks):
            c, x = block(x, c, temb)
            if i + 1 == block_depth:
                mid = (self.adapter_img(x[:, :n_target].mean(1)),
                       self.adapter_text(c.mean(1)))
        x = x[:, :n_target]
        image_hidden = self.image_norm_out(x, temb)
        p = self.patch
        out = self.image_proj_out(image_hidden).reshape(-1, h // p, w // p, p, p,
                                                        self.out_channels)
        sample = out.permute(0, 5, 1, 3, 2, 4).reshape(-1, self.out_channels, h, w)
        text_hidden = self.text_norm_out(c)
        return sample, self.text_proj_out(text_hidden), image_hidden, text_hidden, mid


def _models(cfg, vocab):
    import diffusers
    import transformers

    t = cfg.models.t5
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=t.vocab_size, d_model=t.d_model, d_kv=t.head_dim, d_ff=t.d_ff,
        num_layers=t.num_layers, num_heads=t.num_heads, feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=t.relative_attention_num_buckets,
        relative_attention_max_distance=t.relative_attention_max_distance)).eval()
    v = cfg.models.vae
    n = len(v.block_out_channels)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=v.latent_channels,
        block_out_channels=v.block_out_channels, layers_per_block=v.layers_per_block,
        norm_num_groups=v.norm_num_groups, down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n, use_quant_conv=False,
        use_post_quant_conv=False).eval()
    latent_side = cfg.data.resolution // 2 ** (n - 1)
    model = UniAlignmentTorch(cfg.models.transformer, latent_side)
    return model, t5, vae


def make_step(args, cfg, vocab: int, task: str):
    """The reference train step (a function of nothing) on a batch of the same size as ours."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model, t5, vae = _models(cfg, vocab)
    if dtype != torch.float32:
        t5, vae = t5.to(dtype), vae.to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    b, s, length = args.micro_batch, cfg.data.resolution, cfg.data.max_length
    mask_id, loss = vocab - 1, cfg.loss
    images = torch.rand(args.accum, b, 3, s, s) * 2 - 1
    sources = torch.rand(args.accum, b, 3, s, s) * 2 - 1 if task == "edit" else None
    captions = torch.randint(0, vocab - 1, (args.accum, b, length))
    teacher = torch.randn(2, args.accum, b, cfg.models.transformer.teacher_dim)
    null_ids = torch.ones(1, length, dtype=torch.long)

    def latents_of(x):
        with torch.no_grad():
            dist = vae.encode(x.to(dtype)).latent_dist
            v = cfg.models.vae
            return ((dist.sample() - v.shift_factor) * v.scaling_factor).float()

    def encode(ids):
        with torch.no_grad():
            return t5(ids).last_hidden_state.float()

    def step():
        opt.zero_grad()
        null = encode(null_ids)
        for a in range(args.accum):
            target = latents_of(images[a])
            caption_latents = target if sources is not None else latents_of(images[a])
            conditions = () if sources is None else (latents_of(sources[a]),)
            ids = captions[a]
            context = encode(ids)
            drop = torch.rand(b) < loss.null_prompt_prob
            context = torch.where(drop[:, None, None], null.expand_as(context), context)
            index = (torch.sigmoid(torch.randn(b)) * 1000).long()
            sigma = ((1000 - index) / 1000).float()[:, None, None, None]
            noise = torch.randn_like(target)
            noisy = (1 - sigma) * target + sigma * noise
            v, _, image_hidden, _, (mid_img, _) = model(noisy, (1000 - index).float(), context,
                                                        conditions, loss.block_depth)
            image_loss = ((noisy - sigma * v - target) ** 2).mean()
            u = torch.rand(b)
            t = (1 - 1e-3) * ((u / b + torch.arange(b) / b) % 1) + 1e-3
            masked = torch.where(torch.rand(b, length) < (1 - 1e-3) * t[:, None], mask_id, ids)
            _, logits, _, text_hidden, (_, mid_txt) = model(
                caption_latents, torch.zeros(b), encode(masked), (), loss.block_depth)
            logits = logits.float()
            logits[:, :, mask_id] += -1e6
            log_p = logits.log_softmax(-1)
            keep = masked != mask_id
            log_p = torch.where(keep[..., None], torch.where(
                F.one_hot(masked, vocab).bool(), 0.0, -1e6), log_p)
            caption_loss = (-log_p.gather(-1, ids[..., None])[..., 0] / t[:, None]).mean()
            img = F.normalize(image_hidden.mean(1), dim=-1)
            txt = F.normalize(text_hidden.mean(1), dim=-1)
            sims = img @ txt.T / loss.contrastive_temperature
            labels = torch.arange(b)
            contrastive = (F.cross_entropy(sims, labels) + F.cross_entropy(sims.T, labels)) / 2
            align = sum(1 - (F.normalize(m, dim=1) * F.normalize(f, dim=1)).sum(1).mean()
                        for m, f in ((mid_txt, teacher[1, a]), (mid_img, teacher[0, a])))
            total = (image_loss + loss.caption_weight * caption_loss
                     + loss.contrastive_weight * contrastive + loss.align_weight * align)
            total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()

    return step
