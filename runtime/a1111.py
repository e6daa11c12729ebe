"""AUTOMATIC1111's names for samplers, both ways: what its infotext and its API say, and our scheduler names.

A1111 writes a sampler and, since 1.9, a separate "Schedule type" (`Karras`, `Automatic`, ...); older versions and
many tools fold the schedule into the sampler name (`DPM++ 2M Karras`). Both spellings read here.
"""

from __future__ import annotations

from .schedulers import NAMES

# our name -> A1111's sampler name (A1111's PLMS is the pseudo linear multistep sampler; our `pndm` is its diffusers
# counterpart, the nearest we have)
SAMPLERS: dict[str, str] = {
    "euler_a": "Euler a", "euler": "Euler", "heun": "Heun", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_karras": "DPM++ 2M",
    "ddim": "DDIM", "pndm": "PLMS", "lcm": "LCM", "ddpm": "DDPM",
}
KARRAS = {"dpmpp_2m_karras"}  # ours whose A1111 "Schedule type" is Karras
assert set(SAMPLERS) == set(NAMES)


class SamplerNameError(ValueError):
    """A sampler name (or sampler plus schedule type) we have no scheduler for."""


def sampler_of(scheduler: str) -> tuple[str, str]:
    """Our scheduler name -> (A1111 sampler name, A1111 schedule type)."""
    if scheduler not in SAMPLERS:
        raise SamplerNameError(f"unknown scheduler {scheduler!r}; choose from {', '.join(NAMES)}")
    return SAMPLERS[scheduler], "Karras" if scheduler in KARRAS else "Automatic"


def scheduler_of(sampler: str, schedule: str | None = None) -> str:
    """An A1111 sampler name (case-insensitive; `DPM++ 2M Karras` or `DPM++ 2M` + schedule `Karras`), or one of
    our own names -> our scheduler name."""
    text = " ".join(sampler.split()).lower()
    sched = (schedule or "").strip().lower()
    if sched not in ("", "automatic", "karras"):
        raise SamplerNameError(f"unsupported schedule type {schedule!r} (supported: Automatic, Karras)")
    # one of ours, unless a Karras schedule asks for a variant of it we lack (Euler + Karras is not our euler)
    if text.replace(" ", "_") in NAMES and (sched != "karras" or text.replace(" ", "_") in KARRAS):
        return text.replace(" ", "_")
    karras = text.endswith(" karras")
    if karras:
        text = text[: -len(" karras")]
    karras = karras or sched == "karras"
    for ours, theirs in SAMPLERS.items():
        if theirs.lower() == text and (ours in KARRAS) == karras:
            return ours
    known = sorted({v for v in SAMPLERS.values()}) + ["DPM++ 2M Karras"]
    raise SamplerNameError(f"unknown sampler {sampler!r}{' with schedule Karras' if karras else ''}; "
                           f"supported: {', '.join(known)}")
