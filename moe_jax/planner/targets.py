"""Compile targets: TPU and GPU topologies described without the hardware.

``CHIP:TOPOLOGY`` names a target (``v5p:4x4x4``, ``v5e:16x16``, ``h100:4x8``). TPU
topologies come from ``libtpu`` and GPU ones from the CUDA PJRT plugin
(``jax.experimental.topologies.get_topology_desc``); both give compile-only devices,
so a step can be lowered and compiled for them on a CPU host. ``--slices`` adds
slices (TPU multi-slice, or more GPU clusters joined over the data-center network).

:data:`CHIPS` holds each chip's peak dense bf16 FLOP/s, HBM and HBM bandwidth, from
the vendors' published specifications (sources beside each row); the planner's
roofline is computed from them and is a bound, never a measurement.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from moe_jax.errors import ConfigError

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  platform: str  # "tpu" or "cuda"
  peak_flops: float  # dense bf16 FLOP/s per chip
  hbm_bytes: float  # per chip
  hbm_bandwidth: float  # bytes/s per chip
  source: str
  topology_prefix: str = ""  # libtpu's name of the chip in topology strings
  gpu_spec: str = ""  # GpuTargetConfigProto text for the CUDA compiler


def _gpu_spec(memory: int, bandwidth: int, name: str) -> str:
  # The device description the CUDA compiler needs (Hopper, 132 SMs at 1.98 GHz);
  # the numbers are the device's own as the CUDA driver reports them.
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 1 }}
device_description_str: "{name}"
"""


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "tpu", 275e12, 32 * GiB, 1228e9,
               "cloud.google.com/tpu/docs/v4 (275 TFLOP/s bf16, 32 GiB, 1228 GB/s)",
               topology_prefix="v4"),
    "v5e": Chip("v5e", "tpu", 197e12, 16 * GiB, 819e9,
                "cloud.google.com/tpu/docs/v5e (197 TFLOP/s bf16, 16 GiB, 819 GB/s)",
                topology_prefix="v5e"),
    "v5p": Chip("v5p", "tpu", 459e12, 95 * GiB, 2765e9,
                "cloud.google.com/tpu/docs/v5p (459 TFLOP/s bf16, 95 GiB, 2765 GB/s)",
                topology_prefix="v5"),
    "v6e": Chip("v6e", "tpu", 918e12, 32 * GiB, 1640e9,
                "cloud.google.com/tpu/docs/v6e (918 TFLOP/s bf16, 32 GiB, 1640 GB/s)",
                topology_prefix="v6e"),
    "h100": Chip("h100", "cuda", 989e12, 84942979072, 3.35e12,
                 "NVIDIA H100 SXM5 datasheet (989 TFLOP/s dense bf16, 80 GB HBM3, "
                 "3.35 TB/s)",
                 gpu_spec=_gpu_spec(84942979072, 3352320000000, "NVIDIA H100 80GB HBM3")),
    "h200": Chip("h200", "cuda", 989e12, 150754820096, 4.8e12,
                 "NVIDIA H200 SXM datasheet (989 TFLOP/s dense bf16, 141 GB HBM3e, "
                 "4.8 TB/s)",
                 gpu_spec=_gpu_spec(150754820096, 4800000000000, "NVIDIA H200")),
}


@dataclasses.dataclass
class Target:
  """A parsed ``--target``: the chip, its topology and the compile-only devices."""
  chip: Chip
  topology: str  # as given: "2x2", "4x4x4", or HOSTSxGPUS for GPUs
  slices: int
  devices: list

  @property
  def name(self) -> str:
    suffix = f" x{self.slices} slices" if self.slices > 1 else ""
    return f"{self.chip.name}:{self.topology}{suffix}"

  @property
  def platform(self) -> str:
    return self.chip.platform

  @property
  def chips(self) -> int:
    return math.prod(int(d) for d in self.topology.split("x")) * self.slices

  @property
  def devices_per_chip(self) -> int:
    return max(1, len(self.devices) // self.chips)

  @property
  def peak_flops_per_device(self) -> float:
    return self.chip.peak_flops / self.devices_per_chip

  @property
  def hbm_per_device(self) -> float:
    return self.chip.hbm_bytes / self.devices_per_chip

  @property
  def bandwidth_per_device(self) -> float:
    return self.chip.hbm_bandwidth / self.devices_per_chip


def parse_target(spec: str, slices: int = 1) -> tuple[Chip, str]:
  """``(chip, topology)`` of ``CHIP:TOPOLOGY``, checked before anything compiles.

  Raises:
    ConfigError: one line naming the bad value and the accepted forms.
  """
  chip_name, _, topology = spec.partition(":")
  if chip_name not in CHIPS:
    raise ConfigError([f"--target={spec!r}: unknown chip {chip_name!r}; use one of "
                      f"{', '.join(CHIPS)} as CHIP:TOPOLOGY (v5p:4x4x4, h100:1x8)."])
  chip = CHIPS[chip_name]
  shape = r"\d+x\d+" if chip.platform == "cuda" else r"\d+x\d+(x\d+)?"
  if not re.fullmatch(shape, topology):
    form = ("HOSTSxGPUS, e.g. h100:1x8 or h100:4x8" if chip.platform == "cuda" else
            "the TPU topology, e.g. v5e:2x2, v5e:16x16, v5p:4x4x4")
    raise ConfigError([f"--target={spec!r}: bad topology {topology!r}; use {form}."])
  if any(int(d) < 1 for d in topology.split("x")):
    raise ConfigError([f"--target={spec!r}: every topology size must be >= 1."])
  if chip.platform == "tpu" and chip_name in ("v4", "v5p") and topology.count("x") != 2:
    raise ConfigError([f"--target={spec!r}: {chip_name} topologies are 3-D "
                      f"(e.g. {chip_name}:2x2x1, {chip_name}:4x4x4)."])
  if isinstance(slices, bool) or not isinstance(slices, int) or slices < 1:
    raise ConfigError([f"--slices={slices!r} must be a positive integer."])
  return chip, topology


# Cloud TPU's accelerator type names (v5p-8 counts TensorCores, v5litepod-4 chips).
_ACCELERATOR_TYPES = {"v4": lambda chips: f"v4-{2 * chips}",
                      "v5p": lambda chips: f"v5p-{2 * chips}",
                      "v5e": lambda chips: f"v5litepod-{chips}",
                      "v6e": lambda chips: f"v6e-{chips}"}


def _install_hint(platform: str) -> str:
  import jax  # pylint: disable=import-outside-toplevel
  extra = "tpu" if platform == "tpu" else "cuda12-local"
  what = "libtpu" if platform == "tpu" else "the CUDA PJRT plugin"
  return (f"{what} is not installed: pip install 'jax[{extra}]=={jax.__version__}' "
          "(used only to compile; no accelerator needed)")


def make_target(spec: str, slices: int = 1) -> Target:
  """The :class:`Target` of ``--target=spec --slices=slices`` with its devices.

  Raises:
    ConfigError: a bad spec, a topology the compiler refuses, or a missing compiler
      (with the install command).
  """
  chip, topology = parse_target(spec, slices)
  # Compile-only devices touch no hardware, so several processes (pytest workers)
  # may load libtpu at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if chip.platform == "tpu":
    # Off a TPU VM, libtpu looks for the VM's accelerator type and worker hosts and
    # prints warnings when it finds none; a compile-only topology needs neither.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", _ACCELERATOR_TYPES[chip.name](
        math.prod(int(d) for d in topology.split("x"))))
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    if chip.platform == "tpu":
      kwargs = {"num_slices": slices} if slices > 1 else {}
      desc = topologies.get_topology_desc(
          topology_name=f"{chip.topology_prefix}:{topology}", platform="tpu", **kwargs)
    else:
      hosts, gpus = topology.split("x")
      desc = topologies.get_topology_desc(
          platform="cuda", topology_name="", target_config=chip.gpu_spec,
          topology=f"{slices}x{hosts}x{gpus}")
  except Exception as e:  # pylint: disable=broad-except
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    missing = ("not installed" in msg or "topology not implemented" in msg
               or isinstance(e, ImportError))
    if missing:
      raise ConfigError([f"--target={spec!r}: {_install_hint(chip.platform)}."]) from None
    raise ConfigError([f"--target={spec!r}: the compiler refuses this topology "
                      f"({msg[:300]}); pick another topology."]) from None
  return Target(chip, topology, slices, list(desc.devices))
