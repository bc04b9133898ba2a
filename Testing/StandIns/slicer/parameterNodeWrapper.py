"""Stand-in for ``slicer.parameterNodeWrapper`` (test-only): typed properties over a
vtkMRMLScriptedModuleNode, stored as Slicer's does (node references by role, values as parameters)."""

from __future__ import annotations

import typing


def parameterNodeWrapper(cls):
    hints = typing.get_type_hints(cls)

    def make_property(name: str, kind: type, default):
        is_node = isinstance(kind, type) and hasattr(kind, "GetClassName") and "MRML" in kind.__name__

        def getter(self):
            if is_node:
                return self.parameterNode.GetNodeReference(name)
            raw = self.parameterNode.GetParameter(name)
            if raw == "":
                return default
            return raw.lower() == "true" if kind is bool else kind(raw)

        def setter(self, value) -> None:
            if is_node:
                self.parameterNode.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            else:
                self.parameterNode.SetParameter(name, str(value))

        return property(getter, setter)

    defaults = {n: getattr(cls, n, {bool: False, int: 0, float: 0.0, str: ""}.get(t)) for n, t in hints.items()}

    def __init__(self, parameterNode) -> None:
        self.parameterNode = parameterNode
        for n, t in hints.items():
            if not (isinstance(t, type) and "MRML" in t.__name__) and not parameterNode.GetParameter(n):
                parameterNode.SetParameter(n, str(defaults[n]))

    namespace = {n: make_property(n, t, defaults[n]) for n, t in hints.items()}
    namespace["__init__"] = __init__
    namespace["allParameters"] = property(lambda self: dict(hints))
    return type(cls.__name__, (), {**namespace, "__doc__": cls.__doc__, "__annotations__": hints})
