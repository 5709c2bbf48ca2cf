"""Parity: cfbench's `diki` run against DIKI's official code (lloongx/DIKI at 8ef89e7), written out
below, over two tasks of a tiny random CLIP: clip/attention.py (the prefix attention), DIKI/DIKI.py
(the model's forward with the Gaussian task identification, calibration and batch vote; the training
loop with its per-epoch validation and best epoch) and DIKI/utils.py (the cosine schedule).

Both sides start from the same weights (the prefix pools' initial draws are cfbench's, copied) and
see the same uint8 images normalised by cfbench's pipeline and the same prompts; the official
DataLoader's shuffle is replaced by cfbench's draw (torch.randperm from the global RNG, seeded per
task as cfbench seeds it); the Gaussians are fitted on the training images in dataset order (the
official concatenates its shuffled loader's batches). Compared: the trained prefixes, the Gaussian
statistics, the epoch each task keeps, and per test batch the task chosen and the logits.
Mutations that fail it (tried): calibration off (weight 1 at evaluation), the prefixes in every block
(depth ignored), the cosine without its lr * 1e-3 floor.
"""
import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.distributions import MultivariateNormal

from benchmark.config import resolve
from benchmark.config.templates import task_class_names, task_templates
from benchmark.evaluation.evaluate import zero_shot_weights
from benchmark.models.adapters.prefix import prefix_layers
from benchmark.report.run_folder import CHECKPOINT
from benchmark.run.runner import run_strategy
from strategies.context import BuildContext
from strategies.diki import install
from tasks.loading import load_split
from tests.helpers import assert_resumed_run_is_the_uninterrupted_one, parity_machine, tiny_clip_model

TASKS = ("digits", "faces")
PER_CLASS = 12     # faces: 24 images, more than the tiny CLIP's 16 feature dimensions (a full-rank Gaussian)
DEPTH, LENGTH = 2, 4   # prefixes in 2 of the tiny CLIP's 4 image blocks (and its 1 text block)
LR, EPOCHS = 5.0, 3
BATCH = 32             # the row's 128 shrunk: several steps per epoch, so the schedule's floor shows
EVAL_BATCH = 8
TOLERANCE = 1e-5
SEED = 42


# --- the official code, transcribed ------------------------------------------------------------

def official_multi_head_attention_forward(query, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                                          num_heads, attn_mask=None, prefix=None, batch_weight=None):
    """attention.py:49-146 for self-attention (seq-first query [L, bsz, E]), dropout 0, not causal."""
    tgt_len, bsz, embed_dim = query.shape
    src_len = tgt_len
    if prefix is not None:
        _, _, prefix_len, _ = prefix.shape
    head_dim = embed_dim // num_heads
    q, k, v = F.linear(query, in_proj_weight, in_proj_bias).unflatten(-1, (3, embed_dim)).unsqueeze(0) \
        .transpose(0, -2).squeeze(-2).contiguous()  # _in_projection_packed, q is k is v
    if prefix is not None:
        prefix_k = prefix[:, 0, ...].transpose(0, 1).contiguous()
        prefix_v = prefix[:, 1, ...].transpose(0, 1).contiguous()
    if attn_mask is not None:
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=q.dtype, check_other=False)
        attn_mask = attn_mask.unsqueeze(0)
    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    if prefix is not None:
        prefix_k = prefix_k.view(prefix_k.size(0), bsz * num_heads, head_dim).transpose(0, 1)
        prefix_v = prefix_v.view(prefix_v.size(0), bsz * num_heads, head_dim).transpose(0, 1)
    if attn_mask is not None:
        attn_mask = attn_mask.unsqueeze(0)
    q = q.view(bsz, num_heads, tgt_len, head_dim)
    k = k.view(bsz, num_heads, src_len, head_dim)
    v = v.view(bsz, num_heads, src_len, head_dim)
    if prefix is not None:
        prefix_k = prefix_k.view(bsz, num_heads, prefix_len, head_dim)
        prefix_v = prefix_v.view(bsz, num_heads, prefix_len, head_dim)
    attn_output = F.scaled_dot_product_attention(q, k, v, attn_mask, 0.0, False)
    attn_output = attn_output.permute(2, 0, 1, 3).contiguous().view(bsz * tgt_len, embed_dim)
    if prefix is not None:
        attn_output_prefix = F.scaled_dot_product_attention(q, prefix_k, prefix_v, None, 0.0, False)
        if batch_weight is not None:
            attn_output_prefix = attn_output_prefix * batch_weight.view(bsz, 1, 1, 1)
        attn_output_prefix = attn_output_prefix.permute(2, 0, 1, 3).contiguous().view(bsz * tgt_len, embed_dim)
        # `attn_output += ...` there: torch 2.14's CPU flash attention returns a layout whose permuted view is
        # already contiguous, so the in-place add would modify a tensor autograd needs; the same sum, out of place
        attn_output = attn_output + attn_output_prefix
    attn_output = F.linear(attn_output, out_proj_weight, out_proj_bias)
    return attn_output.view(tgt_len, bsz, attn_output.size(1)), None


class OfficialPrefixedAttention(nn.Module):
    """attention.py:150-210 MultiheadAttention with its prefix_pool (float32 here) and prompt ids; open_clip
    hands it batch-first tensors, the official function takes them sequence-first."""

    def __init__(self, base, pool_size):
        super().__init__()
        self.base = base
        self.prefix_pool = nn.Parameter(torch.zeros(pool_size, 2, LENGTH, base.embed_dim))
        self.prompt_ids, self.batch_weight = None, None

    def forward(self, q_x, k_x, v_x, need_weights=False, attn_mask=None):
        b = self.base
        prefix = None
        if self.prompt_ids is not None:  # :195-201: one id repeated over the attention batch
            ids = self.prompt_ids.repeat(q_x.shape[0], 1) if self.prompt_ids.size(0) == 1 else self.prompt_ids
            prefix = self.prefix_pool[ids.squeeze(1)]
        out, _ = official_multi_head_attention_forward(q_x.transpose(0, 1), b.in_proj_weight, b.in_proj_bias,
                                                       b.out_proj.weight, b.out_proj.bias, b.num_heads, attn_mask,
                                                       prefix, self.batch_weight)
        return out.transpose(0, 1), None


def official_model(checkpoint):
    clip = open_clip.create_model("cfbench-tiny-vit", pretrained=checkpoint)
    original = open_clip.create_model("cfbench-tiny-vit", pretrained=checkpoint).visual  # image_encoder_ori
    layers = {"image": [], "text": []}
    for tower, kind in ((clip.visual.transformer, "image"), (clip.transformer, "text")):
        for block in list(tower.resblocks)[:DEPTH]:  # `prompts_needed > i` (clip/model.py:214-219)
            block.attn = OfficialPrefixedAttention(block.attn, len(TASKS))
            layers[kind].append(block.attn)
    dims = clip.visual.output_dim
    state = {"means": torch.empty(len(TASKS), dims), "covars": torch.empty(len(TASKS), dims, dims), "task_learnt": 0}
    return clip, original, layers, state


def official_forward(clip, original, layers, state, images, tokens, task_ids=None):
    """DIKI.py:153-197 (batchwise_prompt True); returns (logits, indices)."""
    batch_weight = text_batch_weight = None
    with torch.no_grad():
        image_features = original(images)
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    if task_ids is not None:
        indices = task_ids[0:1].unsqueeze(1)
    else:
        dists = [MultivariateNormal(state["means"][i], state["covars"][i]) for i in range(state["task_learnt"])]
        log_probs = torch.vstack([dist.log_prob(image_features) for dist in dists]).t()
        topk, indices = log_probs.topk(k=1, dim=1)
        batch_weight = torch.sigmoid(topk.squeeze(1) / 512 - 1.0)
        text_batch_weight = batch_weight.mean(dim=0, keepdim=True).repeat(len(tokens))
        prompt_id, id_counts = torch.unique(indices, return_counts=True, sorted=True)
        _, major_idx = torch.topk(id_counts, k=1)
        indices = prompt_id[major_idx].unsqueeze(0)
    for layer in layers["text"]:
        layer.prompt_ids, layer.batch_weight = indices, text_batch_weight
    text_features = clip.encode_text(tokens)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    for layer in layers["image"]:
        layer.prompt_ids, layer.batch_weight = indices, batch_weight
    features = clip.encode_image(images)
    features = features / features.norm(dim=-1, keepdim=True)
    return clip.logit_scale.exp() * features @ text_features.t(), indices


def official_cosine_schedule(total_step, value, final_value):
    """utils.py:10-25 without warm-up (lr_warmup_step 0: DIKI.py:352)."""
    steps = np.arange(total_step)
    return final_value + 0.5 * (value - final_value) * (1 + np.cos(np.pi * steps / len(steps)))


def official_train_one_task(model, task_id, normalize, tokens, train, val, seed):
    """DIKI.py:338-434 (and :320-325: the best epoch's checkpoint loaded after the task); returns the epoch kept."""
    clip, original, layers, state = model
    pools = [layer.prefix_pool for kind in ("image", "text") for layer in layers[kind]]
    for p in clip.parameters():
        p.requires_grad_(False)
    for p in pools:  # "prompt_key" / "prefix_pool" in the name (:223-231)
        p.requires_grad_(True)
    n = len(train.x)
    per_epoch_steps = math.ceil(n / BATCH)
    optimizer = torch.optim.SGD(pools, lr=LR, weight_decay=0.0)  # model.parameters(): the frozen ones get no grad
    lrs = official_cosine_schedule(EPOCHS * per_epoch_steps, LR, LR * 1e-3)
    with torch.no_grad():  # :361-376 (in dataset order here)
        features = original(normalize(train.x))
        features = (features / features.norm(dim=-1, keepdim=True)).float()
    mean = features.mean(dim=0)
    delta = features - mean.unsqueeze(0)
    covar = delta.t() @ delta / (features.size(0) - 1)
    covar += torch.eye(covar.size(0)) * 1e-7
    state["means"][task_id], state["covars"][task_id] = mean, covar
    state["task_learnt"] += 1
    best_epoch, best_acc, saved = -1, -1, None
    torch.manual_seed(seed)  # cfbench seeds each task (seed * 1000 + t); its loader's shuffles follow
    task_ids = torch.full((BATCH,), task_id)
    for epoch in range(EPOCHS):
        order = torch.randperm(n)
        for idx in range(per_epoch_steps):
            for group in optimizer.param_groups:  # scheduler.step(cur_iter_idx)
                group["lr"] = lrs[epoch * per_epoch_steps + idx]
            batch = order[idx * BATCH:(idx + 1) * BATCH]
            logits, _ = official_forward(clip, original, layers, state, normalize(train.x[batch]), tokens,
                                         task_ids[:len(batch)])
            loss = F.cross_entropy(logits, train.y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():  # validation, the task given (:414-434)
            logits, _ = official_forward(clip, original, layers, state, normalize(val.x), tokens,
                                         torch.full((len(val.x),), task_id))
            acc = (logits.argmax(dim=1) == val.y).float().mean()
        if acc > best_acc:
            best_epoch, best_acc, saved = epoch, acc, [p.detach().clone() for p in pools]
    with torch.no_grad():
        for p, s in zip(pools, saved):
            p.copy_(s)
    return best_epoch


# --- the test ------------------------------------------------------------------------------------

def _config(tmp_path, path):
    return resolve({
        "protocol": "zscl-mtil",
        "strategy_params": {"diki": {"depth": DEPTH, "length": LENGTH}},
        "tasks": list(TASKS), "eval_only": [],
        "model": {"name": "cfbench-tiny-vit", "pretrained": path},
        "rows": {"diki": {"train": {"epochs": EPOCHS, "batch_size": BATCH, "max_train_per_class": PER_CLASS}}},
        "eval": {"probe_max_per_class": 2, "test_max_per_class": 4, "batch_size": EVAL_BATCH},
        **parity_machine(tmp_path, SEED)})


@pytest.fixture(scope="module")
def diki_run(tiny_clip_checkpoint, tmp_path_factory):
    """(checkpoint path, folder, its config, the uninterrupted two-task run)."""
    path, _ = tiny_clip_checkpoint
    tmp_path = tmp_path_factory.mktemp("diki")
    cfg = _config(tmp_path, path)
    return path, tmp_path, cfg, run_strategy(cfg.replace(strategies=["diki"]), "diki", tmp_path / "run")


def test_diki_two_tasks_match_the_official_code(diki_run):
    path, tmp_path, cfg, run_dir = diki_run
    ran = yaml.safe_load((run_dir / "config.yaml").read_text())
    t = ran["train"]
    assert (t["optimizer"], t["momentum"], t["lr"], t["lr_floor"], t["warmup_steps"], t["label_smoothing"]) == \
        ("sgd", 0.0, LR, 1e-3, 0, 0.0)  # the protocol's diki row
    assert cfg.for_strategy("diki").train.batch_size == BATCH and resolve({"protocol": "zscl-mtil"}).for_strategy(
        "diki").train.batch_size == 128
    state = torch.load(run_dir / CHECKPOINT, weights_only=True)
    ours = {k.removeprefix("encoder."): v for k, v in state["model"].items() if k.startswith("encoder.")}

    io = tiny_clip_model(path)
    install(io, BuildContext(seed=SEED, tasks=TASKS), DEPTH, LENGTH, 512.0, 1.0, True, 0)
    model = official_model(path)
    official_layers = model[2]["image"] + model[2]["text"]
    assert len(official_layers) == len(prefix_layers(io)) == DEPTH + 1
    with torch.no_grad():  # the same initial draws
        for theirs, mine in zip(official_layers, prefix_layers(io)):
            theirs.prefix_pool.copy_(mine.prefix_pool)

    size, root, fmt = ran["model"]["image_size"], ran["data_root"], ran["cache_format"]
    kept, tests, prompts = [], [], {}
    for task_id, name in enumerate(TASKS):
        train = load_split(name, "train", size, root, PER_CLASS, SEED, None, fmt)
        val = load_split(name, "val", size, root, None, SEED, None, fmt)
        template = task_templates(name, ran["eval"]["templates"])[0]
        prompts[name] = [template.format(c) for c in task_class_names(name, root, ran["eval"]["classnames"])]
        kept.append(official_train_one_task(model, task_id, io.normalize, io.tokenizer(prompts[name]), train, val,
                                            SEED * 1000 + task_id))
        tests.append((name, load_split(name, "test", size, root, 4, SEED, None, fmt)))

    # the trained prefixes and the Gaussians
    for i, theirs in enumerate(official_layers):
        tower = "clip.visual.transformer" if i < DEPTH else "clip.transformer"
        mine = ours[f"{tower}.resblocks.{i % DEPTH}.attn.prefix_pool"]
        error = float((mine - theirs.prefix_pool.detach()).norm() / theirs.prefix_pool.detach().norm())
        assert error <= TOLERANCE, (i, error)
        assert not torch.equal(mine[:, 1], torch.zeros_like(mine[:, 1]))  # the values trained
    clip, original, layers, gauss = model
    torch.testing.assert_close(ours["diki_identifier.means"], gauss["means"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["diki_identifier.covariances"], gauss["covars"], rtol=1e-4, atol=1e-7)
    assert int(ours["diki_identifier.learnt"]) == gauss["task_learnt"] == 2
    assert "DIKI: prefixes of epoch" in (run_dir / "log.txt").read_text()
    assert [int(line.split("epoch ")[1].split()[0]) - 1 for line in (run_dir / "log.txt").read_text().splitlines()
            if "prefixes of epoch" in line] == kept

    # evaluation: per test batch, the task chosen and the logits (calibrated), cfbench's routed encoder
    io.load_state_dict(ours)
    io.eval()
    chosen = []
    for name, split in tests:
        tokens = io.tokenizer(prompts[name])
        for start in range(0, len(split.x), EVAL_BATCH):
            x = split.x[start:start + EVAL_BATCH]
            with torch.no_grad():
                theirs, indices = official_forward(clip, original, layers, gauss, io.normalize(x), tokens)
                features = io(x)
                task, _ = io.last_route
                text = zero_shot_weights(io, prompts[name], ["{}"])
                mine = io.logit_scale * F.normalize(features, dim=-1) @ text.T
            assert task == int(indices)
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
            chosen.append(task)
    assert set(chosen) == {0, 1}


def test_diki_resumed_after_its_first_task_is_the_uninterrupted_run(diki_run):
    """Prefixes, Gaussians and the routed matrices, bit for bit."""
    path, tmp_path, cfg, full = diki_run
    part = run_strategy(cfg.replace(strategies=["diki"]), "diki", tmp_path / "part", stop_after=1)
    assert_resumed_run_is_the_uninterrupted_one(full, part, "diki_identifier.means")
