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

    def connectGui(self, gui) -> int:
        """Bind each widget of ``gui`` (an object whose attributes are widgets) that has the dynamic property
        SlicerParameterName to that parameter, both ways, as Slicer's guiConnectors do for node combo boxes
        (currentNodeChanged) and line edits (textChanged). Returns a tag for disconnectGui."""
        import vtk

        bound = []
        for widget in list(vars(gui).values()):
            name = widget.property("SlicerParameterName") if hasattr(widget, "property") else None
            if not name:
                continue
            if name not in hints:  # wrapper.py _checkParamName
                raise ValueError(f"Cannot find a param with the given name: {name}")
            if hasattr(widget, "setCurrentNode"):
                signal, to_gui = "currentNodeChanged(vtkMRMLNode*)", lambda w, v: w.setCurrentNode(v)
            else:
                signal, to_gui = "textChanged(QString)", lambda w, v: setattr(w, "text", str(v))

            def to_parameter(value, name=name) -> None:
                setattr(self, name, value)

            widget.connect(signal, to_parameter)
            bound.append((widget, name, signal, to_parameter, to_gui))

        def update_gui(caller=None, event=None) -> None:
            for widget, name, _, _, to_gui in bound:
                to_gui(widget, getattr(self, name))

        update_gui()
        observer = self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, update_gui)
        self._guis = {**getattr(self, "_guis", {}), observer: bound}
        return observer

    def disconnectGui(self, tag) -> None:
        bound = getattr(self, "_guis", {}).pop(tag, None)
        if bound is None:
            return
        self.parameterNode.RemoveObserver(tag)
        for widget, _, signal, to_parameter, _ in bound:
            widget.disconnect(signal, to_parameter)

    namespace = {n: make_property(n, t, defaults[n]) for n, t in hints.items()}
    # Forwarded to the node, as the real wrapper does (widgets observe the wrapper itself).
    namespace["AddObserver"] = lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(
        event, callback, priority)
    namespace["RemoveObserver"] = lambda self, tag: self.parameterNode.RemoveObserver(tag)
    namespace["Modified"] = lambda self: self.parameterNode.Modified()
    namespace["connectGui"] = connectGui
    namespace["disconnectGui"] = disconnectGui
    namespace["__init__"] = __init__
    namespace["allParameters"] = property(lambda self: dict(hints))
    return type(cls.__name__, (), {**namespace, "__doc__": cls.__doc__, "__annotations__": hints})
