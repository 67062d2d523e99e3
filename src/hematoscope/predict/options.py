"""How a loaded bundle is run: the inference options ``predict``, ``evaluate`` and the Ray engine
share, in one object passed from the CLI down to every actor (and kept in a Ray job's
``job.json``, so a resumed job is checked against the options it was started with)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hematoscope.bundle.base import Bundle

#: Written into a job spec even at their defaults (job.json files of earlier versions hold them so).
_ALWAYS_IN_SPEC = ("tta", "abstain_below", "backend")


@dataclass(frozen=True)
class InferenceOptions:
    """What changes how a bundle answers, beyond what it was saved with. Every field left at its
    default keeps the bundle's own setting.

    Attributes:
        backend: auto (ONNX Runtime when the bundle has model.onnx), torch or onnx.
        tta: test-time views per image (:meth:`Bundle.set_tta`).
        abstain_below: abstain when the top probability is below this.
        classes: answer only among these classes (:meth:`Bundle.restrict_classes`).
        reframe: False turns the bundle's framing search off; True or None keeps it.
        framing: the share of each crop's side the model sees (:meth:`Bundle.set_framing`).
        recolour: add the colour changes to the framing search (:meth:`Bundle.set_recolour`).
        ood_accept: the OOD flag's operating point (:meth:`Bundle.set_ood_accept`).

    Raises:
        ValueError: ``recolour`` with ``reframe=False`` (the colour changes are part of the
            framing search).
    """

    backend: str = "auto"
    tta: int | None = None
    abstain_below: float | None = None
    classes: tuple[str, ...] | None = None
    reframe: bool | None = None
    framing: float | None = None
    recolour: bool = False
    ood_accept: float | None = None

    def __post_init__(self) -> None:
        if self.classes is not None:
            # a tuple: the options stay hashable and compare equal however the classes came
            object.__setattr__(self, "classes", tuple(self.classes) or None)
        if self.recolour and self.reframe is False:
            raise ValueError("--recolour is part of the framing search: it cannot go with --no-reframe")

    def apply(self, bundle: "Bundle", *, threads: int | None = None) -> "Bundle":
        """Set these options on a loaded bundle (in place; returned for chaining). The backend
        is made ready now, so an unusable one fails here rather than at the first batch;
        ``threads`` limits its intra-op threads (e.g. to a Ray actor's CPUs)."""
        if self.backend in (None, "auto") or self.backend in bundle.backends:
            bundle.use_backend(self.backend, threads=threads)
        if self.abstain_below is not None:  # the cut alone: per-view trust and the cascade stay
            bundle.set_abstain_below(self.abstain_below)
        if self.tta is not None:
            bundle.set_tta(self.tta)
        if self.classes:
            bundle.restrict_classes(list(self.classes))
        if self.reframe is False:
            bundle.set_reframe(None)
        if self.recolour:
            bundle.set_recolour()
        if self.framing is not None:
            bundle.set_framing(self.framing)
        if self.ood_accept is not None:
            bundle.set_ood_accept(self.ood_accept)
        return bundle

    def spec(self) -> dict[str, Any]:
        """The options as JSON: the three a job spec always held, then those that were set."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _ALWAYS_IN_SPEC or value != f.default:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "InferenceOptions":
        """The options of :meth:`spec` (other keys of a job spec are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in spec.items() if k in names})

    def replace(self, **changes: Any) -> "InferenceOptions":
        """A copy with some fields changed."""
        from dataclasses import replace

        return replace(self, **changes)
