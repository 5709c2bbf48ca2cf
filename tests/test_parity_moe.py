"""Parity: cfbench's `moe-adapters` run against MoE-Adapters' official code (JiazuoYu/MoE-Adapters4CL,
mtil/ at 4572d97, the CVPR version), written out below, over two tasks of a tiny random CLIP:
clip/model.py (the MoE block, noisy top-k gating, SparseDispatcher), clip/adapter.py (the expert),
src/models/finetune.py (the training loop, the frozen-expert list), src/models/AutoEncoder.py (the
selector's autoencoders and their training) and src/models/evaluation.py (the per-batch choice).

Both sides start from the same weights (the experts' and autoencoders' initial draws are cfbench's,
copied), see the same uint8 images normalised by cfbench's pipeline and the same prompts, and draw
the same random numbers: the official DataLoader's shuffle is replaced by what cfbench's loader
draws (torch.randperm over the task from the global RNG, seeded per task as cfbench seeds it), and
the autoencoders see cfbench's selector batches; the gating noise and the experts' dropout then come
from the same generator in the same order (text tower first, as finetune.py:172-177). Compared:
every trained tensor, the experts each block froze, the autoencoders, and the task each test batch
is routed to. Mutations that fail it (tried): top-1 instead of top-2 gating, no expert freezing
(freeze_top 0), the selector's threshold ignored, the image tower run before the text tower.
"""
import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from benchmark.config import resolve
from benchmark.config.templates import task_class_names, task_templates
from benchmark.models.adapters.moe import moe_layers
from benchmark.models.adapters.selector import TaskSelector
from benchmark.report.run_folder import CHECKPOINT
from benchmark.run.runner import run_strategy
from strategies.context import BuildContext
from strategies.moe_adapters import install
from tasks.loading import load_split
from tests.helpers import assert_resumed_run_is_the_uninterrupted_one, parity_machine, tiny_clip_model
from tests.test_parity_ldifs import official_cosine_lr

TASKS = ("digits", "faces")
PER_CLASS = 4          # 40 and 8 training images: one batch of 64 each step
EXPERTS, TOP_K = 6, 2  # the official 22 experts shrunk for a tiny model; top-2 as --topk 2
ITERATIONS, WARMUP = 6, 2
LRS = {"digits": 5e-3, "faces": 1e-3}  # order I's first two values (train_full_shot_...sh:11)
REFERENCE = "foolbox_imagenet"  # the selector's reference slot (TinyImageNet officially)
AE_STEPS, AE_REFERENCE_STEPS, AE_BATCH = 20, 20, 16
EXTRACTOR = "clip"  # the frozen CLIP image embedding: random AlexNet features of 32 px images are nearly constant
THRESHOLD = 0.003      # between the errors of the digits batches and those of unseen images (measured)
TOLERANCE = 1e-5
KEY_TOLERANCE = 1e-3   # (no attention weight trains here; kept for symmetry with the ZSCL test)
SEED = 42


# --- the official code, transcribed ------------------------------------------------------------

class OfficialAdapter(nn.Module):
    """clip/adapter.py:14-69 with init_option lora, adapter_scalar 0.1, dropout 0.1, no layer norm."""

    def __init__(self, d_model):
        super().__init__()
        self.scale = 0.1
        self.down_proj = nn.Linear(d_model, 64)
        self.non_linear_func = nn.ReLU()
        self.up_proj = nn.Linear(64, d_model)
        self.dropout = 0.1

    def forward(self, x):
        down = self.non_linear_func(self.down_proj(x))
        down = F.dropout(down, p=self.dropout, training=self.training)
        return self.up_proj(down) * self.scale  # add_residual=False at every call site (model.py:498-499)


class OfficialSparseDispatcher:
    """clip/model.py:16-127."""

    def __init__(self, num_experts, gates):
        self._gates = gates
        self._num_experts = num_experts
        sorted_experts, index_sorted_experts = torch.nonzero(gates).sort(0)
        _, self._expert_index = sorted_experts.split(1, dim=1)
        self._batch_index = torch.nonzero(gates)[index_sorted_experts[:, 1], 0]
        self._part_sizes = (gates > 0).sum(0).tolist()
        gates_exp = gates[self._batch_index.flatten()]
        self._nonzero_gates = torch.gather(gates_exp, 1, self._expert_index)

    def dispatch(self, inp):
        inp_exp = inp[self._batch_index].squeeze(1)
        return torch.split(inp_exp, self._part_sizes, dim=0)

    def combine(self, expert_out):
        stitched = torch.cat(expert_out, 0).mul(self._nonzero_gates)
        zeros = torch.zeros(self._gates.size(0), expert_out[-1].size(1), device=stitched.device)
        return zeros.index_add(0, self._batch_index, stitched.float())


class OfficialMoEBlock(nn.Module):
    """ResidualAttentionBlock.forward with the MoE (clip/model.py:300-345, 429-460, 465-511), around
    open_clip's own attention and MLP (batch-first, so the official permutes fall away)."""

    def __init__(self, block, tasks, text_or_image, top_k=TOP_K):
        super().__init__()
        d_model = block.ln_2.normalized_shape[0]
        self.block = block
        self.experts_num, self.top_k, self.text_or_image = EXPERTS, top_k, text_or_image
        self.router_list = nn.ParameterList([nn.Parameter(torch.zeros(d_model, EXPERTS)) for _ in range(tasks)])
        self.w_noise_list = nn.ParameterList([nn.Parameter(torch.zeros(d_model, EXPERTS)) for _ in range(tasks)])
        self.adaptmlp_list = nn.ModuleList([OfficialAdapter(d_model) for _ in range(EXPERTS)])
        self.choose_map = torch.zeros(EXPERTS)
        self.is_train, self.task_id, self.val_task_id = True, 0, None

    def get_weight_dtype(self):  # what open_clip's transformer asks its first block
        return self.block.get_weight_dtype()

    def noisy_top_k_gating(self, x, train, w_gate, w_noise, noise_epsilon=1e-2):
        clean_logits = x @ w_gate.to(x)
        if train:  # self.noisy_gating is True (model.py:313)
            noise_stddev = F.softplus(x @ w_noise.to(x)) + noise_epsilon
            logits = clean_logits + torch.randn_like(clean_logits) * noise_stddev
        else:
            logits = clean_logits
        top_logits, top_indices = logits.topk(min(self.top_k + 1, self.experts_num), dim=1)
        top_k_gates = F.softmax(top_logits[:, :self.top_k], dim=1)
        return torch.zeros_like(logits).scatter(1, top_indices[:, :self.top_k], top_k_gates)
        # (the load and the balancing loss, model.py:456-483, are computed and never used)

    def forward(self, x, attn_mask=None):
        b = self.block
        x = x + b.attention(q_x=b.ln_1(x), attn_mask=attn_mask)
        if self.val_task_id == -1:  # autorouter and zero-shot (model.py:471-473)
            return x + b.mlp(b.ln_2(x))
        x_re = x[:, 0, :]
        task = self.val_task_id if self.val_task_id is not None else self.task_id
        gates = self.noisy_top_k_gating(x_re, self.is_train, self.router_list[task], self.w_noise_list[task])
        for number, count in zip(*torch.unique(torch.nonzero(gates)[:, 1], return_counts=True)):
            self.choose_map[number] += count  # Counter over (sample, expert) pairs (model.py:486-492)
        dispatcher = OfficialSparseDispatcher(self.experts_num, gates)
        expert_inputs = dispatcher.dispatch(x.reshape(x.shape[0], -1))
        expert_outputs = [self.adaptmlp_list[i](expert_inputs[i].view(expert_inputs[i].shape[0], x.shape[1],
                                                                      x.shape[2])) for i in range(self.experts_num)]
        expert_outputs = [o.view(o.shape[0], -1) for o in expert_outputs if o.shape[0] != 0]
        y = dispatcher.combine(expert_outputs).view(x.shape)
        return x + b.mlp(b.ln_2(x)) + y


def official_model(checkpoint, top_k=TOP_K):
    model = open_clip.create_model("cfbench-tiny-vit", pretrained=checkpoint)
    for tower, kind in ((model.visual.transformer, "image"), (model.transformer, "text")):
        for i, block in enumerate(tower.resblocks):
            tower.resblocks[i] = OfficialMoEBlock(block, len(TASKS), kind, top_k)
    return model


def official_blocks(model):
    return [m for m in model.modules() if isinstance(m, OfficialMoEBlock)]


def official_finetune(model, task_id, frozen_list, lr, normalize, tokens, images, labels, seed):
    """finetune.py:14-220 for task `task_id` (--iterations, --ls 0.2, --frozen from the second task);
    returns the names it appends to the frozen list."""
    for block in official_blocks(model):
        block.task_id, block.val_task_id, block.is_train = task_id, None, True
        block.choose_map.zero_()  # a fresh process per task (train_full_shot_...sh)
    params = []
    for k, v in model.named_parameters():  # :84-114
        trainable = ("adaptmlp" in k or "router" in k or "noise" in k) and k not in frozen_list
        v.requires_grad = trainable
        if trainable:
            params.append(v)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.999))  # :122-124
    scheduler = official_cosine_lr(optimizer, lr, WARMUP, ITERATIONS)  # :125-127 (utils.py:13-32)
    logit_scale = model.logit_scale
    torch.manual_seed(seed)  # cfbench seeds each task (seed * 1000 + t); the draws below follow it
    for iteration in range(ITERATIONS + 1):  # :140
        order = torch.randperm(len(images))  # the batch (one per step: the task fits in 64)
        model.train()  # :153
        scheduler(iteration)  # :154
        x, y = normalize(images[order]), labels[order]
        embeddings = model.encode_text(tokens)  # :172-174
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
        out = model.encode_image(x)  # :176-178
        out = out / out.norm(dim=-1, keepdim=True)
        logits_per_image = logit_scale.exp() * out @ embeddings.t()  # :180
        loss = F.cross_entropy(logits_per_image, y, label_smoothing=0.2)  # :181-182
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    frozen = []  # :195-220, top-2 per layer of each tower
    for tower, prefix in ((model.visual.transformer, "visual.transformer"), (model.transformer, "transformer")):
        for i, block in enumerate(tower.resblocks):
            for idx in torch.topk(block.choose_map, 2).indices:
                frozen += [f"{prefix}.resblocks.{i}.adaptmlp_list.{idx}.{p}.{w}"
                           for p in ("down_proj", "up_proj") for w in ("weight", "bias")]
    return frozen


def official_train_autoencoder(autoencoder, feature_extractor, batches, num_batches, total_iterations, init_lr=0.01):
    """AutoEncoder.py:155-189: Adam(lr 0.003, wd 1e-4), lr reset to 0.01 * 0.1 ** (epoch // 10) every
    step; `batches` is the loader (cfbench's selector batches, so both sides see the same). The few-shot
    chooser (few_shot_AutoEncoder.py:192-222) is the same loop with init_lr 0.003, its 5-shot loader and
    num_batches = len(dataset.train_loader), the whole train split's (:193)."""
    optimizer_encoder = torch.optim.Adam(autoencoder.parameters(), lr=0.003, weight_decay=0.0001)
    for iteration in range(total_iterations + 1):
        if iteration % num_batches == 0:
            data_iter = iter(batches())
        try:
            images = next(data_iter)
        except StopIteration:
            data_iter = iter(batches())
            images = next(data_iter)
        input_to_ae = feature_extractor(images)
        input_to_ae = input_to_ae.view(input_to_ae.size(0), -1)
        for param_group in optimizer_encoder.param_groups:  # exp_lr_scheduler(..., int(iteration/num_batches), 0.01)
            param_group["lr"] = init_lr * (0.1 ** (int(iteration / num_batches) // 10))
        optimizer_encoder.zero_grad()
        input_to_ae = torch.sigmoid(input_to_ae)
        loss = F.mse_loss(autoencoder(input_to_ae), input_to_ae)
        loss.backward()
        optimizer_encoder.step()


def official_choose(feature_extractor, autoencoders, images, threshold):
    """evaluation.py:44-71: the task id (-1: zero-shot CLIP) of one evaluation batch."""
    with torch.no_grad():
        outputs = feature_extractor(images)
        outputs = torch.sigmoid(outputs.view(outputs.size(0), -1))
        best_l = F.mse_loss(autoencoders[0](outputs), outputs)
        best_router = 0
        for i in range(1, len(autoencoders)):
            loss = F.mse_loss(autoencoders[i](outputs), outputs)
            if loss < best_l:
                best_l, best_router = loss, i
            if best_l > threshold:
                best_router = 0
        return best_router - 1


# --- the test ------------------------------------------------------------------------------------

def _selector_batches(images, normalize, seed):
    """cfbench's selector batches (strategies/moe_adapters.py `_fit`): a private generator seeded
    per slot, a fresh permutation per pass."""
    generator = torch.Generator().manual_seed(seed)
    per_epoch = -(-len(images) // AE_BATCH)

    def batches():
        order = torch.randperm(len(images), generator=generator)
        for k in range(per_epoch):
            yield normalize(images[order[k * AE_BATCH:(k + 1) * AE_BATCH]])
    return batches, per_epoch


def _config(tmp_path, path, **moe):
    return resolve({
        "protocol": "zscl-mtil",
        "strategy_params": {"moe-adapters": {"experts": EXPERTS, "top_k": TOP_K, "extractor": EXTRACTOR,
                                             "threshold": THRESHOLD, "reference_task": REFERENCE,
                                             "reference_iterations": AE_REFERENCE_STEPS,
                                             "selector_iterations": AE_STEPS, "selector_batch_size": AE_BATCH,
                                             **moe}},
        "tasks": list(TASKS), "eval_only": [],
        "model": {"name": "cfbench-tiny-vit", "pretrained": path},
        "train": {"lr": {**LRS, "default": 1e-3}, "iterations": ITERATIONS + 1, "schedule_steps": ITERATIONS,
                  "warmup_steps": WARMUP, "max_train_per_class": PER_CLASS, "augment": {"kind": "none"}},
        "eval": {"probe_max_per_class": 2, "test_max_per_class": 4, "batch_size": 8},
        **parity_machine(tmp_path, SEED)})


@pytest.fixture(scope="module")
def moe_run(tiny_clip_checkpoint, tmp_path_factory):
    """(checkpoint path, folder, the uninterrupted two-task run)."""
    path, _ = tiny_clip_checkpoint
    tmp_path = tmp_path_factory.mktemp("moe")
    cfg = _config(tmp_path, path)
    return path, tmp_path, run_strategy(cfg.replace(strategies=["moe-adapters"]), "moe-adapters", tmp_path / "run")


def test_moe_adapters_two_tasks_match_the_official_code(moe_run):
    path, tmp_path, run_dir = moe_run
    ran = yaml.safe_load((run_dir / "config.yaml").read_text())
    state = torch.load(run_dir / CHECKPOINT, weights_only=True)
    assert state["completed"] == 2
    ours = {k.removeprefix("encoder."): v for k, v in state["model"].items() if k.startswith("encoder.")}

    # the starting point: cfbench's installed experts and autoencoders (their initial draws), copied
    io = tiny_clip_model(path)
    install(io, BuildContext(seed=SEED, tasks=TASKS), EXPERTS, TOP_K, 2, 64, EXTRACTOR, THRESHOLD, REFERENCE,
            AE_REFERENCE_STEPS, AE_STEPS, AE_BATCH)
    model = official_model(path)
    for official, layer in zip(official_blocks(model), moe_layers(io)):
        for adapter, expert in zip(official.adaptmlp_list, layer.moe_experts):
            adapter.down_proj.load_state_dict(expert.down.state_dict())
            adapter.up_proj.load_state_dict(expert.up.state_dict())
    extractor = copy.deepcopy(io.selector.extractor)
    assert all(torch.equal(v, ours[f"selector.extractor.{k}"]) for k, v in extractor.state_dict().items())
    autoencoders = copy.deepcopy(io.selector.autoencoders)

    size, root, fmt = ran["model"]["image_size"], ran["data_root"], ran["cache_format"]
    reference = load_split(REFERENCE, "train", size, root, None, SEED, None, fmt).x
    batches, per_epoch = _selector_batches(reference, io.normalize, SEED * 1000 - 1)
    official_train_autoencoder(autoencoders[0].requires_grad_(True), extractor, batches, per_epoch,
                               AE_REFERENCE_STEPS)
    frozen_list, routes_ours, routes_official, tests = set(), [], [], []
    for t, name in enumerate(TASKS):
        split = load_split(name, "trainval", size, root, PER_CLASS, SEED, None, fmt)
        batches, per_epoch = _selector_batches(split.x, io.normalize, SEED * 1000 + t)
        official_train_autoencoder(autoencoders[t + 1].requires_grad_(True), extractor, batches, per_epoch,
                                   AE_STEPS)
        template = task_templates(name, ran["eval"]["templates"])[0]
        prompts = [template.format(c) for c in task_class_names(name, root, ran["eval"]["classnames"])]
        frozen_list |= set(official_finetune(model, t, frozen_list, LRS[name], io.normalize, io.tokenizer(prompts),
                                             split.x, split.y, SEED * 1000 + t))
        tests.append(load_split(name, "test", size, root, 4, SEED, None, fmt).x)

    # trained tensors: experts and routers (every other tensor is frozen on both sides)
    names = {"adaptmlp_list": "moe.moe_experts", "router_list": "moe.moe_gates", "w_noise_list": "moe.moe_noise",
             "down_proj": "down", "up_proj": "up"}
    errors, moved = {}, 0
    for k, theirs in model.named_parameters():
        if not any(part in k for part in ("adaptmlp_list", "router_list", "w_noise_list")):
            continue
        mine = "clip." + k
        for old, new in names.items():
            mine = mine.replace(old, new)
        errors[k] = float((ours[mine] - theirs.detach()).norm() / theirs.detach().norm().clamp_min(1e-12))
        moved += int(theirs.detach().abs().sum() > 0)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, (worst, errors[worst])
    assert moved > len(errors) // 3  # routers of both tasks, up projections, ... trained away from zero

    # the experts each block froze: the official list's names, cfbench's frozen buffers
    frozen_official = {(k.split(".adaptmlp_list.")[0], int(k.split(".adaptmlp_list.")[1].split(".")[0]))
                       for k in frozen_list}
    frozen_ours = {(k.removeprefix("clip.").removesuffix(".moe.frozen").replace(".block", ""), int(e))
                   for k, v in ours.items() if k.endswith(".moe.frozen") for e in torch.nonzero(v).flatten()}
    assert frozen_ours == frozen_official and len(frozen_ours) > 2 * 5

    # the selector: autoencoders equal, and each test batch routed to the same task (or zero-shot)
    for i, ae in enumerate(autoencoders):
        for k, v in ae.state_dict().items():
            mine = ours[f"selector.autoencoders.{i}.{k}"]
            assert float((mine - v).norm() / v.norm()) <= TOLERANCE, (i, k)
    selector = TaskSelector(copy.deepcopy(extractor), extractor(torch.zeros(1, 3, size, size)).numel(), len(TASKS),
                            THRESHOLD)
    selector.load_state_dict({k.removeprefix("selector."): v for k, v in ours.items() if k.startswith("selector.")})
    unseen = load_split("photo_patches", "test", size, root, 1, SEED, None, fmt).x
    for x in [*tests, reference[:8], unseen]:
        for start in range(0, len(x), 8):
            batch = io.normalize(x[start:start + 8])
            routes_ours.append(selector.choose(batch))
            routes_official.append(official_choose(extractor, autoencoders, batch, THRESHOLD))
    assert routes_ours == routes_official
    assert {-1, 0} <= set(routes_official), routes_official  # a task's router, and zero-shot CLIP


def test_moe_adapters_resumed_after_its_first_task_is_the_uninterrupted_run(moe_run):
    """Experts, routers, frozen experts, the selector's autoencoders and the routed matrices: bit for bit."""
    path, tmp_path, full = moe_run
    cfg = _config(tmp_path, path)
    part = run_strategy(cfg.replace(strategies=["moe-adapters"]), "moe-adapters", tmp_path / "part", stop_after=1)
    assert_resumed_run_is_the_uninterrupted_one(full, part, ".moe.frozen")


@pytest.mark.parametrize("epoch", [3, 2])
def test_the_few_shot_selector_counts_epochs_of_the_whole_train_split(epoch):
    """few_shot_AutoEncoder.py:192-222: a 5-shot loader of 2 batches while an epoch is num_batches of the
    whole train loader (3 here): the loader starts over every 3 steps and whenever it runs out, and the lr
    (0.003) steps down after 10 such epochs. fit_slot given that epoch trains the same autoencoder; given
    the 5-shot loader's own 2 batches (the `trained` epoch) it does not."""
    torch.manual_seed(0)
    extractor = nn.Sequential(nn.Flatten(), nn.Linear(12, 8))
    selector = TaskSelector(extractor, 8, 1, threshold=1.0, seed=0)
    official = copy.deepcopy(selector.autoencoders[1]).requires_grad_(True)
    images = torch.rand(24, 3, 2, 2)

    def loader(seed):
        generator = torch.Generator().manual_seed(seed)
        return lambda: iter(images[torch.randperm(24, generator=generator)].split(16))

    selector.fit_slot(1, loader(5), epoch, 40, lr=0.003, decay=True)
    official_train_autoencoder(official, extractor, loader(5), 3, 40, init_lr=0.003)
    same = all(torch.equal(a, b) for a, b in zip(selector.autoencoders[1].state_dict().values(),
                                                 official.state_dict().values()))
    assert same == (epoch == 3)


def test_mtil_fewshot_counts_the_selectors_epochs_over_the_whole_train_split():
    from strategies.moe_adapters import MoEAdaptersPlugin
    from tasks import split_count

    params = resolve({"protocol": "mtil-fewshot"}).strategy_params["moe-adapters"]
    assert (params["selector_lr"], params["selector_lr_decay"], params["selector_epoch"]) == (0.003, True, "split")
    ctx = BuildContext(tasks=TASKS, train_split="trainval", seed=SEED)
    plugin = MoEAdaptersPlugin(ctx, 2, None, 0, 300, 64, 0.003, True, "split")
    assert [plugin._epoch_batches(t) for t in range(2)] == [-(-split_count(n, "trainval", None, None, SEED) // 64)
                                                           for n in TASKS] == [20, 3]  # 1,258 and 140 images
    assert MoEAdaptersPlugin(ctx, 2, None, 0, 300, 64)._epoch_batches(0) is None


@pytest.mark.parametrize("mode", ["crops", "once", "none"])
def test_the_selector_fits_on_augmented_batches_and_leaves_the_training_rng_alone(mode):
    """AutoEncoder.py:153-159 builds the selector's dataset with train_preprocess (RandomResizedCrop):
    every autoencoder step sees fresh crops. cfbench crops each selector batch with the run's training
    augmentation, its boxes drawn from the slot's seed alone; with `once` (the few-shot chooser stacks
    one augmented pass, few_shot_AutoEncoder.py:167-189) each image keeps one view. The global RNG the
    training draws from is left as it was. Without the crops (the old behaviour) the autoencoder differs."""
    from types import SimpleNamespace

    from benchmark.run.augment import RandomResizedCropBatch
    from strategies.moe_adapters import MoEAdaptersPlugin

    torch.manual_seed(0)
    extractor = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 8))
    selector = TaskSelector(extractor, 8, 1, threshold=1.0, seed=0)
    official = copy.deepcopy(selector.autoencoders[1]).requires_grad_(True)
    images = torch.randint(0, 256, (24, 3, 8, 8), dtype=torch.uint8)
    crop = RandomResizedCropBatch((0.5, 1.0), once=mode == "once")
    encoder = SimpleNamespace(selector=selector, normalize=lambda x: x.float() / 255,
                              parameters=lambda: iter([torch.zeros(1)]))
    plugin = MoEAdaptersPlugin(BuildContext(tasks=("digits",), seed=0), 2, None, 0, 30, 16)
    before = torch.get_rng_state()
    plugin._fit(encoder, 1, images, 30, seed=7, augment=None if mode == "none" else crop)
    assert torch.equal(torch.get_rng_state(), before)

    generator = torch.Generator().manual_seed(7)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        if mode == "once":  # the stacked first pass: one box per image, drawn before training
            views = crop.views(images)
            fresh = RandomResizedCropBatch((0.5, 1.0))
            stacked = torch.cat([fresh(images[i:i + 1], boxes=views[i:i + 1]) for i in range(24)])

        def loader():  # the official loader: a shuffled pass, each sample through train_preprocess as it is read
            order = torch.randperm(24, generator=generator)
            if mode == "once":
                return (stacked[index].float() / 255 for index in order.split(16))
            return (RandomResizedCropBatch((0.5, 1.0))(images[index]).float() / 255 for index in order.split(16))

        official_train_autoencoder(official, extractor, loader, 2, 30)
    same = all(torch.equal(a, b) for a, b in zip(selector.autoencoders[1].state_dict().values(),
                                                 official.state_dict().values()))
    assert same == (mode != "none")
