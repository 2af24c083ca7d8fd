"""Model packs: a diffusers-layout directory (unet/, vae/, text_encoder/, tokenizer/, scheduler/)
plus an optional manifest, `tandem_pack.json`.

The edge server loads a large pack, the device (UE) a small one plus a user's LoRA. The same code
loads real Stable Diffusion layouts (SD 1.5, BK-SDM, small-sd) from a local directory or, when
online, a hub id. Two packs can share a trajectory only when their latent space and noise process
agree: `check_pair` refuses any other pair, naming the mismatch.

torch and the model classes load only inside load_pack, so reading a manifest stays cheap: the
CLI checks flags and prompts before any model code loads. A pack loads only what runs: the VAE's
decoder (nothing encodes images), and with lazy_text the text encoder on its first use (a process
given its prompt embeddings never loads it). With compact, weights stored narrower than the compute
dtype (fp16 files on a CPU that computes in fp32) stay in memory as stored and each layer's weight is
widened only while it runs (tandem/compact.py): half the weights' memory, the same images.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandem.request import DEFAULT_GUIDANCE, DEFAULT_IMAGE_SIZE, DEFAULT_SAMPLER, DEFAULT_STEPS, RequestError
from tandem.resolve import RequestDefaults
from tandem.sampling.names import SAMPLERS
from tandem.vocabulary import apply_aliases

if TYPE_CHECKING:
    import torch

MANIFEST_NAME = "tandem_pack.json"
# The embedded, trained demo pack (large/ for the edge, small/ with LoRAs for the device): every
# command and service defaults to it.
DEMO_PACK = Path(__file__).parent / "demo_pack"
MANIFEST_VERSION = 1
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class PackError(ValueError):
    """A pack that cannot be loaded or used as asked; the message says what and where."""


class PackMismatchError(PackError):
    """Two packs that cannot continue each other's trajectories."""


@dataclass(frozen=True)
class PackManifest:
    """Tandem's small manifest beside the diffusers layout (all fields optional on disk)."""

    name: str
    role: str = "any"  # "large" (edge), "small" (device) or "any"
    default_sampler: str = DEFAULT_SAMPLER
    default_steps: int = DEFAULT_STEPS
    default_guidance: float = DEFAULT_GUIDANCE
    image_size: int | None = None  # None: the UNet's sample size times the VAE's factor (ModelPack)
    # Component name → directory relative to the pack, for components shared with another pack.
    components: dict[str, str] = field(default_factory=dict)
    # User name → LoRA safetensors file relative to the pack.
    users: dict[str, str] = field(default_factory=dict)
    random: bool = False  # an untrained pack made for tests: its images are noise
    # The words its text encoder was trained on (empty: unknown, no prompt check) and words read
    # as others before tokenizing (e.g. "an" -> "a"); see tandem/vocabulary.py.
    vocabulary: tuple[str, ...] = ()
    aliases: dict[str, str] = field(default_factory=dict)
    # Relative path -> size in bytes of every file the pack was built with (tandem/true_size.py):
    # a pack whose files differ is partial or corrupt and is refused before anything loads.
    files: dict[str, int] = field(default_factory=dict)

    def normalize_prompt(self, prompt: str) -> str:
        return apply_aliases(prompt, self.aliases)

    def request_defaults(self, image_size: int | None = None) -> RequestDefaults:
        """What a request to this pack leaves unset becomes (tandem.resolve). Without the loaded
        pack's ``image_size``, a manifest that declares none gives the library's default size."""
        return RequestDefaults(steps=self.default_steps, sampler=self.default_sampler,
                               guidance_scale=self.default_guidance,
                               image_size=image_size or int(self.image_size or DEFAULT_IMAGE_SIZE))

    @classmethod
    def read(cls, root: Path) -> "PackManifest":
        path = root / MANIFEST_NAME
        if not path.is_file():
            return cls(name=root.name)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PackError(f"{path}: unreadable manifest ({exc})") from exc
        version = data.get("format_version", MANIFEST_VERSION)
        if version != MANIFEST_VERSION:
            raise PackError(f"{path}: format_version {version} is not supported (expected {MANIFEST_VERSION})")
        known = {f for f in cls.__dataclass_fields__}
        fields = {k: v for k, v in data.items() if k in known}
        fields.setdefault("name", root.name)
        vocabulary, aliases = fields.get("vocabulary", []), fields.get("aliases", {})
        if not (isinstance(vocabulary, list) and all(isinstance(w, str) for w in vocabulary)):
            raise PackError(f"{path}: vocabulary must be a list of words")
        if not (isinstance(aliases, dict) and all(isinstance(v, str) for v in aliases.values())):
            raise PackError(f"{path}: aliases must map words to words")
        fields["vocabulary"] = tuple(vocabulary)
        manifest = cls(**fields)
        if manifest.default_sampler not in SAMPLERS:
            raise PackError(f"{path}: default_sampler {manifest.default_sampler!r} is not one of {SAMPLERS}")
        return manifest


@dataclass
class TextModel:
    """A pack's prompt encoder: its tokenizer and text encoder, loaded together."""

    tokenizer: Any
    encoder: Any


@dataclass
class ModelPack:
    """Loaded components of one pack, on one device."""

    name: str
    root: Path
    manifest: PackManifest
    unet: Any
    vae: Any  # the decoder half only (see _load_vae)
    sampler_config: dict[str, Any]
    device: torch.device
    dtype: torch.dtype
    text_dirs: tuple[Path, Path]  # (text_encoder, tokenizer), loaded by text_model() on first use
    offload: bool = False
    # Component -> the dtype its weights are held in, as stored, widened as each layer runs
    # (tandem/compact.py).
    compact: dict[str, torch.dtype] = field(default_factory=dict)
    active_user: str | None = None
    text: TextModel | None = None
    # The text encoder held only while a prompt is encoded (a device short of memory): loaded for
    # each encoding, freed when the last one in flight ends, so its weights never sit beside the
    # UNet's step and the VAE's decode at the peak.
    transient_text: bool = False
    _text_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _text_users: int = field(default=0, repr=False, compare=False)

    @contextmanager
    def encoding_text(self) -> Iterator[TextModel]:
        """The text model for one encoding; with `transient_text` it goes when no encoding needs it."""
        with self._text_lock:
            model = self._text_locked()
            self._text_users += 1
        try:
            yield model
        finally:
            with self._text_lock:
                self._text_users -= 1
                if self.transient_text and self._text_users == 0:
                    self.text = None
            if self.transient_text:
                from tandem.memory import give_back_freed

                del model
                give_back_freed()  # its memory back to the OS now, before the steps that follow

    def text_model(self) -> TextModel:
        """The tokenizer and text encoder, loaded on first use (once, whichever thread asks)."""
        with self._text_lock:
            return self._text_locked()

    def _text_locked(self) -> TextModel:
        if self.text is None:
            stored = self.compact.get("text_encoder", self.dtype)
            self.text = _load_text(self.root, *self.text_dirs, self.device, stored, self.offload)
            if "text_encoder" in self.compact:
                from tandem.compact import compact

                compact(self.text.encoder, self.dtype)
        return self.text

    @property
    def text_encoder(self) -> Any:
        return self.text_model().encoder

    @property
    def tokenizer(self) -> Any:
        return self.text_model().tokenizer

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def vae_scale_factor(self) -> int:
        # Both VAE kinds halve the resolution at every encoder block but the last.
        config = self.vae.config
        blocks = getattr(config, "block_out_channels", None) or config.encoder_block_out_channels
        return 2 ** (len(blocks) - 1)

    @property
    def latent_scaling(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 1.0) or 1.0)

    @property
    def default_image_size(self) -> int:
        if self.manifest.image_size:
            return int(self.manifest.image_size)
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def request_defaults(self) -> RequestDefaults:
        """What a request to this pack leaves unset becomes (tandem.resolve.resolve)."""
        return self.manifest.request_defaults(self.default_image_size)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        if height % f or width % f:
            field = "height" if height % f else "width"
            raise RequestError(field, f"image size {height}x{width} must be a multiple of {f} for pack {self.name!r}")
        return (self.latent_channels, height // f, width // f)

    @property
    def users(self) -> list[str]:
        return sorted(self.manifest.users)

    def use_user(self, user: str | None) -> None:
        """Activates `user`'s LoRA on the UNet (None: the base model). Adapters load once."""
        if user == self.active_user:
            return
        if user is None:
            self.unet.disable_lora()
            self.active_user = None
            return
        if user not in self.manifest.users:
            known = ", ".join(self.users) or "none"
            raise PackError(f"unknown user {user!r} for pack {self.name!r} (users: {known})")
        loaded = getattr(self.unet, "peft_config", None) or {}
        if user not in loaded:
            lora = self.root / self.manifest.users[user]
            if not lora.is_file():
                raise PackError(f"LoRA for user {user!r} missing: {lora}")
            if lora.suffix != ".safetensors":  # anything else may be a pickle: code, not weights
                raise PackError(f"LoRA for user {user!r} must be a .safetensors file, got {lora.name}")
            with warnings.catch_warnings(), _onloaded(self.unet, self.device, self.offload):
                # several adapters on one UNet is the design, not a mistake
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                self.unet.load_lora_adapter(str(lora.parent), weight_name=lora.name, prefix="unet", adapter_name=user,
                                            use_safetensors=True)
        self.unet.enable_lora()
        self.unet.set_adapters([user])
        self.active_user = user


def default_device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    import torch

    # fp16 halves GPU memory and is what SD packs ship; CPUs run fp32 (fp16 is slow or unsupported).
    return torch.float16 if device.type == "cuda" else torch.float32


def resolve_source(source: str | os.PathLike) -> Path:
    """A local pack directory for `source`: a path, or a hub id fetched (or found in the cache)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise PackError(f"model pack {text!r} not found: no such directory")
    return _fetch_from_hub(text)


def _fetch_from_hub(repo_id: str) -> Path:
    # Short timeouts: an unreachable hub must fail fast with a clear error, never hang.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", MANIFEST_NAME, "*/config.json", "*/*.safetensors", "*/*.json", "*/*.txt"]
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline))
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one clear message
        hint = "offline (HF_HUB_OFFLINE is set) and not in the local cache" if offline else "hub unreachable?"
        raise PackError(f"could not fetch model pack {repo_id!r} from the hub: {hint} ({type(exc).__name__})") from exc


def verify_pack_files(root: Path) -> PackManifest:
    """The pack's manifest, once every file it records is there at its recorded size; a pack
    without a manifest, or with a file missing or of another size, is refused by name."""
    if not (root / MANIFEST_NAME).is_file():
        raise PackError(f"pack {root}: no {MANIFEST_NAME} (a partial build?)")
    manifest = PackManifest.read(root)
    for name, size in manifest.files.items():
        path = root / name
        found = path.stat().st_size if path.is_file() else None
        if found != size:
            what = "missing" if found is None else f"{found:,} bytes, expected {size:,}"
            raise PackError(f"pack {root}: {name} is {what} (partial or corrupt: rebuild it)")
    return manifest


def check_memory(root: Path, dirs: dict[str, Path], device: torch.device, dtype: torch.dtype,
                 narrow: dict[str, torch.dtype], offload: bool) -> None:
    """Refuses, in one line and before loading, a pack whose weights (widened to `dtype` unless
    held compact) need more memory than the device has free."""
    import torch

    from tandem.compact import stored_dtype

    need = 0
    for name in ("unet", "vae", "text_encoder"):
        stored = stored_dtype(dirs[name]) or dtype
        held = narrow.get(name, dtype)
        weights = sum(p.stat().st_size for p in dirs[name].glob("*.safetensors"))
        need += weights * held.itemsize // stored.itemsize
    free: int | None = _available_memory()
    where = "this machine"
    if device.type == "cuda" and not offload:
        free, where = torch.cuda.mem_get_info(device)[0], f"GPU {device}"
    if free is not None and need > free:
        raise PackError(f"pack {root} needs {need / 2**30:.1f} GiB of memory for its weights "
                        f"(as {str(dtype).removeprefix('torch.')}); {where} has {free / 2**30:.1f} GiB free")


def _available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _component_dir(root: Path, manifest: PackManifest, component: str) -> Path:
    directory = (root / manifest.components.get(component, component)).resolve()
    if not directory.is_dir():
        raise PackError(f"pack {root}: component {component!r} missing (looked in {directory})")
    return directory


def load_pack(
    source: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    user: str | None = None,
    offload: bool = False,
    lazy_text: bool = False,
    compact: bool = False,
    transient_text: bool = False,
) -> ModelPack:
    """Loads a pack for inference (eval mode, no grad), weights safetensors-only. With `offload`
    (a CUDA device smaller than the pack), the weights stay in CPU memory and accelerate moves
    each layer to the GPU only while it runs. With `lazy_text`, the text encoder loads on the
    first prompt encoded (never, for a process given its prompt embeddings); by default it loads
    now, so a broken one fails at startup, not in a server's first request. With `compact` (a
    device short of memory), each component whose weights are all stored in one dtype narrower
    than `dtype` keeps them so (tandem/compact.py); the others load as usual. With
    `transient_text`, the text encoder is held only while it encodes a prompt (ModelPack.encoding_text)."""
    import torch

    # Each class from its own module: diffusers' package __init__s still load every model class
    # (and torch._dynamo, peft, transformers with them), but the CLIP model classes load only
    # when the text encoder does.
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    from tandem.compact import compact as compact_module
    from tandem.compact import stored_dtype

    quiet_loading()
    root = resolve_source(source)
    manifest = verify_pack_files(root) if (root / MANIFEST_NAME).is_file() else PackManifest.read(root)
    device = torch.device(device) if device is not None else default_device()
    if offload and compact:
        raise PackError("--offload and --compact-weights do not combine: choose one (offload keeps the weights "
                        "in CPU memory already)")
    if offload and not (device.type == "cuda" and torch.cuda.is_available()):
        where = "this machine has no CUDA GPU" if device.type == "cuda" else f"the device is {device}"
        raise PackError(f"--offload needs a CUDA GPU (it keeps the weights in CPU memory and moves each layer "
                        f"to the GPU as it runs); {where}")
    dtype = dtype or default_dtype(device)
    dirs = {c: _component_dir(root, manifest, c) for c in COMPONENTS}
    sampler_config = _read_json(dirs["scheduler"] / "scheduler_config.json")
    try:
        # compact components load in their stored dtype: their weights never exist in `dtype` at once
        narrow = {name: stored for name in ("unet", "vae", "text_encoder") if compact
                  and (stored := stored_dtype(dirs[name])) is not None and stored.itemsize < dtype.itemsize}
        check_memory(root, dirs, device, dtype, narrow, offload)
        unet = UNet2DConditionModel.from_pretrained(dirs["unet"], torch_dtype=narrow.get("unet", dtype),
                                                    use_safetensors=True)
        vae = _load_vae(dirs["vae"], narrow.get("vae", dtype))
    except (OSError, ValueError) as exc:
        raise PackError(f"pack {root}: {exc}") from exc
    for name, module in (("unet", unet), ("vae", vae)):
        _place(module, device, offload)
        if name in narrow:
            compact_module(module, dtype)
    pack = ModelPack(
        name=manifest.name,
        root=root,
        manifest=manifest,
        unet=unet,
        vae=vae,
        sampler_config=sampler_config,
        device=device,
        dtype=dtype,
        text_dirs=(dirs["text_encoder"], dirs["tokenizer"]),
        offload=offload,
        compact=narrow,
        transient_text=transient_text,
    )
    if not lazy_text:  # a broken text encoder fails now (a transient one is then let go)
        with pack.encoding_text():
            pass
    if user is not None:
        pack.use_user(user)
    return pack


# The VAE's decoder half: what decode() runs. The encoder (a third of an SD VAE: 34M parameters)
# is never built; AutoencoderTiny has no post_quant_conv.
VAE_DECODER_PREFIXES = ("decoder.", "post_quant_conv.")
VAE_ENCODER_MODULES = ("encoder", "quant_conv")


def _load_vae(directory: Path, dtype: torch.dtype) -> Any:
    """The VAE with its decoder's weights only, read from the safetensors file: the model is built
    on the meta device (accelerate), the encoder removed before any weight is materialized. A
    layout this cannot read exactly (old key names, sharded files) loads in full through diffusers
    and drops the encoder after: the same decoder, only a higher peak while loading."""
    from accelerate import init_empty_weights
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTiny
    from safetensors import SafetensorError, safe_open

    config = _read_json(directory / "config.json")
    vae_class = AutoencoderTiny if config.get("_class_name") == "AutoencoderTiny" else AutoencoderKL
    weights = directory / "diffusion_pytorch_model.safetensors"
    if weights.is_file():
        with init_empty_weights():
            vae = _drop_encoder(vae_class.from_config(config))
        try:
            with safe_open(str(weights), framework="pt") as f:
                state = {k: f.get_tensor(k).to(dtype) for k in f.keys() if k.startswith(VAE_DECODER_PREFIXES)}
        except SafetensorError as exc:
            raise PackError(f"{weights}: unreadable safetensors file ({exc})") from exc
        try:
            vae.load_state_dict(state, strict=True, assign=True)
            return vae
        except RuntimeError:  # keys in another layout: diffusers' own loader converts them
            pass
    return _drop_encoder(vae_class.from_pretrained(directory, torch_dtype=dtype, use_safetensors=True))


def _drop_encoder(vae: Any) -> Any:
    for name in VAE_ENCODER_MODULES:
        if name in vae._modules:
            delattr(vae, name)
    return vae


def _load_text(root: Path, encoder_dir: Path, tokenizer_dir: Path, device: torch.device, dtype: torch.dtype,
               offload: bool) -> TextModel:
    from transformers.models.clip.modeling_clip import CLIPTextModel
    from transformers.models.clip.tokenization_clip import CLIPTokenizer

    try:
        encoder = CLIPTextModel.from_pretrained(encoder_dir, torch_dtype=dtype, use_safetensors=True)
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError) as exc:
        raise PackError(f"pack {root}: {exc}") from exc
    _place(encoder, device, offload)
    return TextModel(tokenizer=tokenizer, encoder=encoder)


def _place(module: Any, device: torch.device, offload: bool) -> None:
    module.eval().requires_grad_(False)
    if offload:
        from accelerate import cpu_offload

        cpu_offload(module, execution_device=device)
    else:
        module.to(device)


@contextmanager
def _onloaded(module: Any, device: torch.device, offload: bool) -> Iterator[None]:
    """An offloaded module with its weights back in place: accelerate's hooks serve a snapshot of
    the weights taken when it was offloaded, so a LoRA goes in with the hooks off, then the module
    is offloaded again, adapter included."""
    if not offload:
        yield
        return
    from accelerate.hooks import remove_hook_from_submodules

    remove_hook_from_submodules(module)
    try:
        yield
    finally:
        _place(module, device, offload)


def quiet_loading() -> None:
    """Loading bars from transformers/diffusers would drown Tandem's own progress output."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise PackError(f"missing {path}") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise PackError(f"unreadable {path}: {exc}") from exc


def check_pair(edge: ModelPack, ue: ModelPack) -> None:
    """Raises PackMismatchError unless `ue` can continue trajectories that `edge` started."""
    from tandem.sampling.schedule import noise_process

    checks = [
        ("latent channels", edge.latent_channels, ue.latent_channels),
        ("VAE downsampling factor", edge.vae_scale_factor, ue.vae_scale_factor),
        ("VAE latent scaling_factor", edge.latent_scaling, ue.latent_scaling),
        ("UNet input channels", edge.unet.config.in_channels, ue.unet.config.in_channels),
    ]
    edge_process, ue_process = noise_process(edge.sampler_config), noise_process(ue.sampler_config)
    checks += [(f"sampler config {key}", edge_process[key], ue_process[key]) for key in edge_process]
    for what, a, b in checks:
        if a != b:
            raise PackMismatchError(
                f"packs {edge.name!r} and {ue.name!r} are not a valid pair: {what} differs ({a!r} vs {b!r})"
            )
