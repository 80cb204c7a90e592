"""Single-file LoRAs (Stable Diffusion's diffusers and kohya files), normalised into PEFT's form.

Every format is read into one internal form (:class:`LoraFile`: per component, per module, the file keys
of ``lora_A`` / ``lora_B`` and the module's rank and alpha), whose selected component is fed to the PEFT
planning path as a folder would be (:func:`open_adapter`):

- :mod:`~.diffusers`: ``unet.<path>.lora_A.weight`` keys (+ metadata), the older ``lora.down`` /
  ``processor.to_q_lora`` keys;
- :mod:`~.kohya`: ``lora_unet_<path_with_underscores>.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha`` (and ``lora_te_`` / ``lora_te1_`` / ``lora_te2_``), names resolved against the graph;
- :mod:`~.detect`: which format, refusals (LoHa, LoKr, IA3, diffs, DoRA-in-kohya), the component.

The component contract (for pipeline folders): :func:`components` names the parts a file adapts
(``unet``, ``text_encoder``, ``text_encoder_2``...); ``apply_peft(model, file, component=NAME)`` (and
``plan_peft_adapter``) apply one of them to that part's model; :func:`select_component` gives its modules
with the prefix stripped (``LoraFile.peft_keys()`` -> ``<module.path>.lora_A.weight`` ...).
"""

from lora_onnx.adapters.formats.detect import (
    choose_component,
    components,
    is_lora_file,
    read_lora_file,
    select_component,
)
from lora_onnx.adapters.formats.records import LoraFile, LoraModule
from lora_onnx.adapters.formats.source import (
    FileAdapterConfig,
    OpenedAdapter,
    PeftRef,
    open_adapter,
    parse_adapter_spec,
    with_strength,
)

__all__ = [
    "FileAdapterConfig",
    "LoraFile",
    "LoraModule",
    "OpenedAdapter",
    "PeftRef",
    "choose_component",
    "components",
    "is_lora_file",
    "open_adapter",
    "parse_adapter_spec",
    "read_lora_file",
    "select_component",
    "with_strength",
]
