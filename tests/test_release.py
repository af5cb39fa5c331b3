"""A miniature of the public aTLAS / task-vector release, read through every command without the authors' code.

A scratch package `src.modeling` with classes of the authors' shape (ImageEncoder holding an open_clip CLIP as
`model`, its text tower deleted as keep_lang=False does, with train_preprocess, val_preprocess and cache_dir;
ClassificationHead(torch.nn.Linear) with `normalize`) writes, in a subprocess where `src` is importable,
checkpoints/tinyclip/<Dataset>Val/{zeroshot,finetuned}.pt and head_<Dataset>Val.pt with torch.save (and a raw
pickle.dump of θ0), beside each module's own state_dict. A second subprocess, where `src` is not importable,
runs bank, adapt, eval, merge and select on them; its results are checked against those state dicts, against
a float64 merge by hand and against accuracies computed here with open_clip and the head's own formula.
"""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import adapt_world
from atlas_fast.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

MODELING = '''
import open_clip
import torch


class ImageEncoder(torch.nn.Module):
    def __init__(self, name, state, keep_lang=False):
        super().__init__()
        self.model, self.train_preprocess, self.val_preprocess = open_clip.create_model_and_transforms(name)
        self.model.load_state_dict(state)
        self.cache_dir = "/cache/openclip"
        if not keep_lang and hasattr(self.model, "transformer"):
            delattr(self.model, "transformer")

    def forward(self, images):
        return self.model.encode_image(images)


class ClassificationHead(torch.nn.Linear):
    def __init__(self, normalize, weights, biases=None):
        output_size, input_size = weights.shape
        super().__init__(input_size, output_size)
        self.normalize = normalize
        self.weight = torch.nn.Parameter(weights.clone())
        self.bias = torch.nn.Parameter(biases.clone() if biases is not None else torch.zeros(output_size))

    def forward(self, inputs):
        if self.normalize:
            inputs = inputs / inputs.norm(dim=-1, keepdim=True)
        return super().forward(inputs)
'''

WRITER = '''
import json, os, pickle, sys
import open_clip, torch
import torch.nn.functional as F
from src.modeling import ClassificationHead, ImageEncoder

w, root = json.loads(sys.argv[1]), sys.argv[2]
open_clip.add_model_config(w["config"])
names = w["classnames_list"]


def save(obj, path, ref):
    for p in (path, ref):
        os.makedirs(os.path.dirname(p), exist_ok=True)
    torch.save(obj, path)
    torch.save({k: v.detach().clone() for k, v in obj.state_dict().items()}, ref)


theta0 = torch.load(w["theta0"], weights_only=True)
ckpt = os.path.join(root, "checkpoints", "tinyclip")
for dataset, finetuned in (("UprightVal", w["finetuned"][0]), ("Rot90Val", w["finetuned"][1])):
    save(ImageEncoder("tinyclip", theta0), os.path.join(ckpt, dataset, "zeroshot.pt"),
         os.path.join(root, "ref", "zeroshot.pt"))
    save(ImageEncoder("tinyclip", torch.load(finetuned, weights_only=True)),
         os.path.join(ckpt, dataset, "finetuned.pt"), os.path.join(root, "ref", dataset + "_finetuned.pt"))
with open(os.path.join(ckpt, "UprightVal", "zeroshot_old.pt"), "wb") as f:
    pickle.dump(ImageEncoder("tinyclip", theta0), f)

# the zero-shot heads as the release makes them: logit_scale × normalised class embeddings, normalize=True
clip, _, _ = open_clip.create_model_and_transforms("tinyclip")
clip.load_state_dict(theta0)
tok = open_clip.get_tokenizer("tinyclip")
with torch.no_grad():
    emb = F.normalize(clip.encode_text(tok(["a photo of the number %s." % n for n in names])), dim=-1)
    weights = clip.logit_scale.exp() * emb
g = torch.Generator().manual_seed(3)
for dataset, rows in (("UprightVal", 10), ("NineVal", 9)):
    bias = torch.randn(rows, generator=g) * 0.5
    save(ClassificationHead(True, weights[:rows], bias), os.path.join(ckpt, "head_%s.pt" % dataset),
         os.path.join(root, "ref", "head_%s.pt" % dataset))
'''

READER = '''
import importlib.util, json, os, sys
import torch
assert importlib.util.find_spec("src") is None, "src must not be importable here"
from atlas_fast.io.checkpoints import read_state_dict
from atlas_fast.cli import main

w, root = json.loads(sys.argv[1]), sys.argv[2]
ck = os.path.join(root, "checkpoints", "tinyclip")
zs, out = os.path.join(ck, "UprightVal", "zeroshot.pt"), os.path.join(root, "out")
fts = [os.path.join(ck, d, "finetuned.pt") for d in ("UprightVal", "Rot90Val")]
head = os.path.join(ck, "head_UprightVal.pt")
os.makedirs(out)
for name, path in (("zeroshot", zs), ("zeroshot_old", os.path.join(ck, "UprightVal", "zeroshot_old.pt")),
                   ("UprightVal_finetuned", fts[0]), ("Rot90Val_finetuned", fts[1])):
    torch.save(read_state_dict(path, allow_pickle=True), os.path.join(out, "read_%s.pt" % name))
model = ["--model", w["config"], "--pretrained", zs, "--allow-pickle"]
data = ["--data", w["upright"], "--heads", head]
bank, coef = os.path.join(out, "bank.safetensors"), os.path.join(out, "run", "coefficients.safetensors")
fast = ["--workers", "0", "--no-progress", "--batch-size", "20", "--shots", "5"]
commands = [
    ["bank", "--pretrained", zs, "--finetuned", *fts, "--allow-pickle", "--out", bank],
    ["adapt", *model, "--bank", bank, *data, *fast, "--epochs", "1", "--steps-per-epoch", "3", "--lr", "0.3",
     "--out", os.path.join(out, "run")],
    ["eval", *model, *data, "--bank", bank, "--coefficients", coef, "--finetuned", fts[0],
     "--json", os.path.join(out, "rows.json")],
    ["merge", *model, "--bank", bank, "--coefficients", coef, "--out", os.path.join(out, "merged.pt")],
    ["eval", "--model", w["config"], "--pretrained", os.path.join(out, "merged.pt"), "--allow-pickle", *data,
     "--json", os.path.join(out, "rows_merged.json")],
    ["select", *model, "--bank", bank, *data, *fast, "--keep", "1", "--batches", "1",
     "--out", os.path.join(out, "selected.safetensors")],
]
for args in commands:
    assert main(args) == 0, args
assert not [m for m in sys.modules if m == "src" or m.startswith("src.")], "the authors' module was imported"
'''


def _python(script, *args, cwd, pythonpath=None):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def release(world, tmp_path_factory):
    """The miniature release under root/checkpoints, the module's own state dicts under root/ref, and the outputs
    of every command under root/out."""
    root = tmp_path_factory.mktemp("release")
    writer = root / "authors_code"
    (writer / "src").mkdir(parents=True)
    (writer / "src" / "__init__.py").write_text("")
    (writer / "src" / "modeling.py").write_text(textwrap.dedent(MODELING))
    w = {**world, "classnames_list": adapt_world.CLASSNAMES}
    _python(WRITER, json.dumps(w), str(root), cwd=writer, pythonpath=str(writer))
    (root / "run").mkdir()
    _python(READER, json.dumps(w), str(root), cwd=root / "run")
    return root


def _ref(release, name):
    return torch.load(release / "ref" / f"{name}.pt", weights_only=True)


def test_checkpoints_read_bit_exactly_without_the_authors_code(release):
    for name, ref_name in (("zeroshot", "zeroshot"), ("zeroshot_old", "zeroshot"),
                           ("UprightVal_finetuned", "UprightVal_finetuned"),
                           ("Rot90Val_finetuned", "Rot90Val_finetuned")):
        read = torch.load(release / "out" / f"read_{name}.pt", weights_only=True)
        ref = {k[len("model."):]: v for k, v in _ref(release, ref_name).items()}
        assert list(read) == list(ref), name
        assert not any(k.startswith("transformer.") for k in read), "keep_lang=False deleted the text transformer"
        for k, v in ref.items():
            assert read[k].dtype == v.dtype and torch.equal(read[k], v), (name, k)


def test_bank_is_the_difference_of_the_release_checkpoints(release):
    from safetensors.torch import load_file
    bank = load_file(str(release / "out" / "bank.safetensors"))
    zs = _ref(release, "zeroshot")
    fts = [_ref(release, f"{d}_finetuned") for d in ("UprightVal", "Rot90Val")]
    blocks = [k for k in bank if "::" not in k]
    assert sorted(blocks) == sorted(k[len("model.visual."):] for k in zs if k.startswith("model.visual."))
    for name in blocks:
        key = "model.visual." + name
        assert torch.equal(bank[name], torch.stack([ft[key] - zs[key] for ft in fts])), name


@torch.no_grad()
def _accuracy_by_hand(world, visual_state, head):
    """Accuracy on the validation split of the head's own formula, normalise(f) Wᵀ + b, over open_clip's image
    tower holding `visual_state`, computed here in float64."""
    import open_clip
    from PIL import Image

    from atlas_fast.adapt import load_data
    open_clip.add_model_config(world["config"])
    clip, _, preprocess = open_clip.create_model_and_transforms("tinyclip")
    clip.visual.load_state_dict(visual_state)
    spec = load_data(world["upright"])
    x = torch.stack([preprocess(Image.open(spec.data.samples[i][0])) for i in spec.val])
    y = torch.tensor([spec.data.samples[i][1] for i in spec.val])
    f = clip.visual.double()(x.double())
    logits = F.normalize(f, dim=-1) @ head["weight"].double().t() + head["bias"].double()
    return (logits.argmax(1) == y).double().mean().item()


def test_eval_with_the_release_heads_matches_the_heads_formula(release, world):
    rows = {r["model"]: r["accuracy"] for r in json.loads((release / "out" / "rows.json").read_text())}
    head = _ref(release, "head_UprightVal")
    for label, state in (("pretrained", _ref(release, "zeroshot")),
                         (str(release / "checkpoints/tinyclip/UprightVal/finetuned.pt"),
                          _ref(release, "UprightVal_finetuned"))):
        visual = {k[len("model.visual."):]: v for k, v in state.items() if k.startswith("model.visual.")}
        assert rows[label] == pytest.approx(_accuracy_by_hand(world, visual, head), abs=1e-9), label
    summary = json.loads((release / "out" / "run" / "summary.json").read_text())
    coef = str(release / "out" / "run" / "coefficients.safetensors")
    assert rows[coef] == pytest.approx(summary["selected"][0]["accuracy"], abs=1e-9)
    assert rows["pretrained"] == pytest.approx(summary["initial"][0]["accuracy"], abs=1e-9)
    saved = torch.load(release / "out" / "run" / "heads.pt", weights_only=True)
    assert saved[0]["type"] == "NormalizedLinearHead"
    assert torch.equal(saved[0]["weight"], head["weight"]) and torch.equal(saved[0]["bias"], head["bias"])


def test_merge_keeps_the_release_form_and_is_theta0_plus_c_tau(release):
    from safetensors import safe_open
    merged = torch.load(release / "out" / "merged.pt", weights_only=True)["state_dict"]
    zs = {k[len("model."):]: v for k, v in _ref(release, "zeroshot").items()}
    fts = [{k[len("model."):]: v for k, v in _ref(release, f"{d}_finetuned").items()}
           for d in ("UprightVal", "Rot90Val")]
    assert set(merged) == set(zs), "the merged model has the entries θ0 has: no text transformer"
    coef_file = str(release / "out" / "run" / "coefficients.safetensors")
    with safe_open(coef_file, framework="pt") as f:
        c, names = f.get_tensor("coefficients").double(), json.loads(f.metadata()["block_names"])
    assert c.abs().max() > 0
    for b, name in enumerate(names):
        key = "visual." + name
        want = zs[key].double() + sum(c[t, b] * (ft[key].double() - zs[key].double()) for t, ft in enumerate(fts))
        assert ((merged[key].double() - want).norm() / want.norm()).item() < 1e-6, key
    for key, v in zs.items():
        if not key.startswith("visual."):
            assert torch.equal(merged[key], v), key
    rows = {r["model"]: r["accuracy"] for r in json.loads((release / "out" / "rows.json").read_text())}
    merged_rows = json.loads((release / "out" / "rows_merged.json").read_text())
    assert merged_rows[0]["accuracy"] == pytest.approx(rows[coef_file], abs=1e-9)


def test_select_keeps_release_task_vectors(release):
    from safetensors.torch import load_file
    sel = load_file(str(release / "out" / "selected.safetensors"))
    record = json.loads((release / "out" / "selected.selection.json").read_text())
    zs = _ref(release, "zeroshot")
    fts = [_ref(release, f"{d}_finetuned") for d in ("UprightVal", "Rot90Val")]
    assert record["settings"]["head"] == str(release / "checkpoints/tinyclip/head_UprightVal.pt")
    for block in record["blocks"]:
        key, t = "model.visual." + block["name"], block["chosen"][0]
        assert torch.equal(sel[block["name"]][0], fts[t][key] - zs[key]), block["name"]


def _error(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_release_errors_name_the_file_the_cause_and_the_fix(release, world, capsys):
    assert importlib.util.find_spec("src") is None
    ck = release / "checkpoints" / "tinyclip"
    zs, head = str(ck / "UprightVal" / "zeroshot.pt"), str(ck / "head_UprightVal.pt")
    base = ["--model", world["config"], "--data", world["upright"]]
    line = _error(capsys, "eval", *base, "--pretrained", zs, "--heads", head)
    assert "zeroshot.pt: holds pickled objects" in line and "--allow-pickle" in line
    line = _error(capsys, "eval", *base, "--pretrained", str(release / "out" / "merged.pt"), "--heads", head)
    assert "head_UprightVal.pt: holds pickled objects" in line and "--allow-pickle" in line
    line = _error(capsys, "eval", *base, "--pretrained", zs, "--allow-pickle", "--heads", str(ck / "head_NineVal.pt"))
    assert "head_NineVal.pt: a head of 9 classes for data upright of 10 classes" in line
    line = _error(capsys, "eval", *base, "--pretrained", zs, "--allow-pickle")
    assert "zeroshot.pt has no text tower (no transformer.* entries" in line and "--heads" in line
    # the pickle records its activation (GELU here): an architecture with QuickGELU would load the same tensors
    quick = release / "tinyclip-quickgelu.json"
    quick.write_text(json.dumps({**adapt_world.CONFIG, "quick_gelu": True}))
    line = _error(capsys, "eval", "--model", str(quick), "--data", world["upright"], "--pretrained", zs,
                  "--allow-pickle", "--heads", head)
    assert "zeroshot.pt: its model was built with GELU" in line and "uses QuickGELU" in line
    line = _error(capsys, "adapt", *base, "--pretrained", zs, "--allow-pickle", "--bank",
                  str(release / "out" / "bank.safetensors"), "--workers", "0", "--no-progress")
    assert "zeroshot.pt has no text tower" in line and "--head linear" in line and "--heads" in line


def test_a_run_heads_file_on_data_of_another_class_count(world, tmp_path, capsys):
    """heads.pt of a 10-class run on 9-class data is refused, naming both counts and the file."""
    nine = tmp_path / "nine"
    nine.mkdir()
    for c in range(9):
        os.symlink(os.path.join(world["upright"], str(c)), nine / str(c))
    heads = tmp_path / "heads.pt"
    g = torch.Generator().manual_seed(0)
    torch.save([{"name": "upright", "type": "LinearHead", "weight": torch.randn(10, 32, generator=g),
                 "bias": torch.randn(10, generator=g)}], heads)
    line = _error(capsys, "eval", "--model", world["config"], "--pretrained", world["theta0"], "--data", str(nine),
                  "--heads", str(heads))
    assert f"{heads}: a head of 10 classes for data nine of 9 classes" in line
    line = _error(capsys, "select", "--model", world["config"], "--pretrained", world["theta0"], "--bank",
                  world["bank"], "--data", str(nine), "--heads", str(heads), "--keep", "1", "--out",
                  str(tmp_path / "s.safetensors"), "--workers", "0", "--no-progress")
    assert "a head of 10 classes for data nine of 9 classes" in line
