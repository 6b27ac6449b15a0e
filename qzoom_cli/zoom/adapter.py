"""The zoom adapter: small modules attached to a frozen base model, saved as their own files.

    twig_layers      T decoder layers: the SD-RPN region head (its last layer only lends q/k)
    high_res_layers  T decoder layers + high_res_head (Linear D -> 1): the gate

Names follow the released Q-Zoom checkpoints so both layouts map onto one module tree:
ours (`qzoom_adapter.safetensors` + `qzoom_config.json`, peft-style) and the official one (extra
keys inside the base checkpoint, `model.` or `model.language_model.` prefixed, with
`enable_twig`, `twig_K`, `twig_T`, `enable_high_res`, `reuse_src_pos` in `config.json`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..backbones import Backbone
from ..errors import AdapterMismatch, ModelError, ModelNotAvailable
from .lora import LORA_FOLDER
from .region import RegionHead, scoring_layer_problem

log = logging.getLogger("qzoom")

ADAPTER_WEIGHTS = "qzoom_adapter.safetensors"
ADAPTER_CONFIG = "qzoom_config.json"
ADAPTER_FORMAT = "qzoom.adapter/v1"
QZOOM_RULE, SD_RPN_RULE = "qzoom", "sd_rpn"
REGION_RULES = (QZOOM_RULE, SD_RPN_RULE)
_OFFICIAL_KEY = re.compile(r"^(?:model\.)?(?:language_model\.)?((?:twig_layers|high_res_layers|high_res_head)\..+)$")


@dataclass
class AdapterConfig:
    """What an adapter holds and where it attaches: branch after base layer `branch_layer` (K),
    `depth` (T) layers per branch."""

    branch_layer: int
    depth: int
    region_head: bool = True
    gate: bool = True
    reuse_src_pos: bool = False
    region_norm: bool = False    # a norm of its own before the region head's last layer (SD-RPN's LLaVA twig_norm)
    region_rotary: bool = True   # queries and keys of the region score get the rotary embedding
    region_rule: str | None = None  # how a map becomes the region read (REGION_RULES); None: by origin
    gate_threshold: float | None = None
    roi_threshold: float | None = None
    family: str | None = None
    hidden_size: int | None = None
    base_model: str | None = None
    base_revision: str | None = None
    training: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.region_rule is None:  # adapters converted before the rule was recorded are SD-RPN's
            self.region_rule = SD_RPN_RULE if "converted" in self.training else QZOOM_RULE
        if self.region_rule not in REGION_RULES:
            raise ModelError(f"unknown region_rule {self.region_rule!r} (one of {', '.join(REGION_RULES)})")

    def to_json(self) -> str:
        return json.dumps({"format": ADAPTER_FORMAT, **asdict(self)}, indent=2)

    @classmethod
    def from_file(cls, path: Path) -> AdapterConfig:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or data.pop("format", None) != ADAPTER_FORMAT:
            raise ModelError(f"{path} is not a qzoom adapter config ({ADAPTER_FORMAT})")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ModelError(f"{path}: {exc}") from None


class ZoomAdapter(nn.Module):
    """Region head and gate modules built from the backbone's own decoder-layer class.

    Modules built on a decoder tuned with LoRA were learned on that tuning: saving them writes the
    LoRA weights along (`base_lora`), so the folder always loads the base they fit."""

    def __init__(self, config: AdapterConfig, backbone: Backbone):
        super().__init__()
        check_attachment(config, backbone)
        self.config = config
        self.base_lora = backbone.lora_dir
        k, t = config.branch_layer, config.depth
        if config.region_head:
            self.twig_layers = nn.ModuleList([backbone.new_decoder_layer(k + i) for i in range(t)])
            if config.region_norm:
                self.twig_norm = backbone.new_norm()
        if config.gate:
            self.high_res_layers = nn.ModuleList([backbone.new_decoder_layer(k + i) for i in range(t)])
            self.high_res_head = nn.Linear(backbone.hidden_size, 1, dtype=backbone.dtype,
                                           device=backbone.device)  # pragma: no mutate (tests run on the default device)
        self.eval()

    def region(self) -> RegionHead:
        """The trained region head as the region score uses it."""
        return RegionHead(list(self.twig_layers), getattr(self, "twig_norm", None), self.config.region_rotary)

    @classmethod
    def initialized_from_base(cls, config: AdapterConfig, backbone: Backbone) -> ZoomAdapter:
        """Branch layers start as copies of base layers K..K+T-1 (how training begins)."""
        adapter = cls(config, backbone)
        for name in ("twig_layers", "high_res_layers"):
            for i, layer in enumerate(getattr(adapter, name, [])):
                layer.load_state_dict(backbone.decoder_layers[config.branch_layer + i].state_dict())
        return adapter

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        save_file(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": ADAPTER_FORMAT})
        self.save_config(directory)
        lora = directory / LORA_FOLDER
        if self.base_lora is not None and lora.resolve() != self.base_lora.resolve():
            shutil.copytree(self.base_lora, lora, dirs_exist_ok=True)
        return directory

    def save_config(self, directory: str | Path) -> None:
        """Rewrite only the config (a report added after the weights were written)."""
        (Path(directory) / ADAPTER_CONFIG).write_text(self.config.to_json())

    @classmethod
    def from_pretrained(cls, directory: str | Path, backbone: Backbone) -> ZoomAdapter:
        directory = Path(directory)
        if not (directory / ADAPTER_CONFIG).is_file() or not (directory / ADAPTER_WEIGHTS).is_file():
            raise ModelNotAvailable(f"{directory} is not a qzoom adapter (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
        adapter = cls(AdapterConfig.from_file(directory / ADAPTER_CONFIG), backbone)
        try:
            with safe_open(directory / ADAPTER_WEIGHTS, framework="pt") as weights:
                tensors = {key: weights.get_tensor(key) for key in weights.keys()}
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"{directory / ADAPTER_WEIGHTS} is damaged: {exc}") from None
        adapter.load_strict(tensors, str(directory))
        return adapter

    @classmethod
    def from_official_checkpoint(cls, backbone: Backbone, files: list[Path]) -> ZoomAdapter | None:
        """The Q-Zoom modules stored inside a released checkpoint, or None for a stock checkpoint."""
        config = official_adapter_config(backbone)
        if config is None:
            return None
        tensors: dict[str, torch.Tensor] = {}
        for path in files:
            with safe_open(path, framework="pt") as weights:
                for key in weights.keys():
                    match = _OFFICIAL_KEY.match(key)
                    if match:
                        tensors[match.group(1)] = weights.get_tensor(key)
        adapter = cls(config, backbone)
        adapter.load_strict(tensors, backbone.model_id)
        return adapter

    def load_strict(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Load every expected tensor, refusing missing, unexpected or misshapen ones."""
        expected = self.state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            detail = []
            if missing:
                detail.append(f"missing {len(missing)} (e.g. {missing[0]})")
            if unexpected:
                detail.append(f"unexpected {len(unexpected)} (e.g. {unexpected[0]})")
            raise AdapterMismatch(f"zoom weights in {source} do not match the adapter config: {'; '.join(detail)}")
        for key, tensor in tensors.items():
            if tensor.shape != expected[key].shape:
                raise AdapterMismatch(f"zoom weight {key} in {source} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(expected[key].shape)}")
        self.load_state_dict(tensors)  # strict (the default), though the checks above already said why


def check_attachment(config: AdapterConfig, backbone: Backbone) -> None:
    """Refuse an adapter that cannot fit the model; warn when it was trained on another one."""
    if config.family is not None and config.family != backbone.family:
        raise AdapterMismatch(f"adapter is for {config.family} models, the base model is {backbone.family}")
    if config.hidden_size is not None and config.hidden_size != backbone.hidden_size:
        raise AdapterMismatch(f"adapter expects hidden size {config.hidden_size}, the base model has {backbone.hidden_size}")
    if config.branch_layer < 1 or config.depth < 1 or config.branch_layer + config.depth > backbone.num_layers:
        raise AdapterMismatch(f"branch after layer {config.branch_layer} with {config.depth} layers does not fit a "
                         f"{backbone.num_layers}-layer model")
    problem = scoring_layer_problem(backbone, config.branch_layer, config.depth) if config.region_head else None
    if problem:
        raise AdapterMismatch(f"the adapter cannot fit: {problem}")
    if config.region_rule == SD_RPN_RULE and (backbone.layout.fixed_grid is None or not backbone.layout.canvas.square):
        raise AdapterMismatch(f"SD-RPN's region rule reads a fixed square grid (LLaVA-1.5's); {backbone.family} "
                              "reads pages at their aspect")
    if config.reuse_src_pos and backbone.layout.spatial_rows is None:
        raise AdapterMismatch(f"the adapter aligns region positions inside the page's grid (reuse_src_pos), which "
                              f"{backbone.family}'s 1-D positions cannot do")
    if config.base_model and config.base_model != backbone.model_id:
        log.warning("the adapter was trained on %s, not on %s: its regions and gate may not fit this model",
                    config.base_model, backbone.model_id)


def official_adapter_config(backbone: Backbone) -> AdapterConfig | None:
    """AdapterConfig from the Q-Zoom keys of a checkpoint's config.json (None if it has none)."""
    setting = backbone.checkpoint_setting
    if not setting("enable_twig"):
        return None
    k, t = setting("twig_K"), setting("twig_T")
    if not isinstance(k, int) or not isinstance(t, int):
        raise AdapterMismatch(f"{backbone.model_id} sets enable_twig but not integer twig_K/twig_T")
    gate = bool(setting("enable_high_res"))
    if gate and (setting("high_res_K", k), setting("high_res_T", t)) != (k, t):
        raise AdapterMismatch(f"{backbone.model_id}: a gate branching apart from the region head is not supported")
    return AdapterConfig(branch_layer=k, depth=t, gate=gate,
                         reuse_src_pos=bool(setting("reuse_src_pos")),
                         gate_threshold=setting("high_res_thresh"), family=backbone.family,
                         hidden_size=backbone.hidden_size, base_model=backbone.model_id)


def checkpoint_files(ref: str, revision: str | None) -> list[Path]:
    """The safetensors files of a local checkpoint directory or a (cached) hub checkpoint."""
    local = Path(ref)
    if local.is_dir():
        return sorted(local.glob("*.safetensors"))
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        index = Path(hf_hub_download(ref, "model.safetensors.index.json", revision=revision))
    except EntryNotFoundError:  # no index: a single-file checkpoint (or nothing cached offline)
        try:
            return [Path(hf_hub_download(ref, "model.safetensors", revision=revision))]
        except EntryNotFoundError as exc:
            raise ModelNotAvailable(f"cannot find the safetensors weights of {ref}: {exc}") from None
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [Path(hf_hub_download(ref, shard, revision=revision)) for shard in shards]
