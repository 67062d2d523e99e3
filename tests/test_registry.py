import pytest

from hematoscope._registry import Registry


class RegistryError(ValueError):
    pass


def test_register_get_and_names():
    reg = Registry("widget", error=RegistryError)

    @reg.register("a", label="A")
    class A:
        pass

    assert reg.get("a") is A and A.label == "A"
    assert reg.names() == ["a"] and "a" in reg and list(reg) == ["a"]
    assert reg.register("a")(A) is A  # the same object again is fine (a module imported twice)


def test_duplicate_name_and_unknown_name_raise_the_registry_error():
    reg = Registry("widget", error=RegistryError)
    reg.register("a")(type("A", (), {}))
    with pytest.raises(RegistryError, match="widget 'a' is already registered"):
        reg.register("a")(type("B", (), {}))
    with pytest.raises(RegistryError, match="unknown widget 'z'; known: a"):
        reg.get("z")


def test_lazy_entries_are_listed_and_imported_on_lookup():
    # hematoscope.classical.anomaly registers the isolation_forest scorer when imported
    from hematoscope.bundle.ood import SCORERS

    assert "isolation_forest" in SCORERS.names()
    assert SCORERS.get("isolation_forest").name == "isolation_forest"


@pytest.mark.parametrize("registry", ["hematoscope.bundle.base:_KINDS", "hematoscope.bundle.ood:SCORERS",
                                      "hematoscope.data.readers:READERS", "hematoscope.bundle.base:_EXPLAINERS"])
def test_the_registries_share_the_helper(registry):
    import importlib

    module, name = registry.split(":")
    reg = getattr(importlib.import_module(module), name)
    assert isinstance(reg, Registry)
    for entry in reg.names():
        assert reg.get(entry) is not None
