"""The panel's .ui: parses, uses only real Qt/CTK/qMRML classes, binds only real parameters, and
holds every widget the module code uses; the images the Extensions Index shows of it exist."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from conftest import ROOT

UI = ROOT / "Resources" / "UI" / "LiverSeg.ui"
MODULE = ROOT / "LiverSegModule" / "LiverSegLib" / "widget.py"  # the panel's code

# Widget classes of Qt 5, CTK and Slicer's qMRMLWidgets that LiverSeg may use (checked against their docs).
KNOWN_CLASSES = {
    "QWidget", "QLabel", "QPushButton", "QComboBox", "QProgressBar", "QLineEdit", "QCheckBox", "QSpinBox",
    "QGroupBox", "QFormLayout", "QVBoxLayout", "QHBoxLayout", "QGridLayout",
    "ctkCollapsibleButton", "ctkPathLineEdit", "ctkComboBox", "ctkSliderWidget",
    "qMRMLWidget", "qMRMLNodeComboBox", "qMRMLSegmentSelectorWidget", "qMRMLSubjectHierarchyComboBox",
}
HEADERS = {"ctkCollapsibleButton": "ctkCollapsibleButton.h", "ctkPathLineEdit": "ctkPathLineEdit.h",
           "qMRMLNodeComboBox": "qMRMLNodeComboBox.h", "qMRMLWidget": "qMRMLWidget.h"}


def tree():
    return ET.parse(UI).getroot()


def widgets():
    return {w.get("name"): w for w in tree().iter("widget")}


def test_ui_parses_and_uses_real_classes():
    root = tree()
    classes = {w.get("class") for w in root.iter("widget")} | {lay.get("class") for lay in root.iter("layout")}
    assert classes <= KNOWN_CLASSES, classes - KNOWN_CLASSES
    custom = {c.findtext("class"): c.findtext("header") for c in root.iter("customwidget")}
    for cls in classes:
        if cls.startswith(("ctk", "qMRML")):
            assert custom.get(cls) == HEADERS[cls], f"{cls} must be declared as a custom widget"
    assert root.find("widget").get("class") == "qMRMLWidget"


def test_every_slicer_parameter_name_is_a_parameter():
    import typing

    import LiverSeg

    params = typing.get_type_hints(LiverSeg.LiverSegParameterNode)
    bound = {}
    for name, w in widgets().items():
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[name] = prop.findtext("string")
    assert bound, "no widget is bound to the parameter node"
    assert set(bound.values()) <= set(params), set(bound.values()) - set(params)
    # Node parameters are bound to node combo boxes of the matching node type.
    for widget_name, param in bound.items():
        kind = params[param]
        if hasattr(kind, "GetClassName"):
            w = widgets()[widget_name]
            assert w.get("class") == "qMRMLNodeComboBox"
            types = [s.text for p in w.findall("property") if p.get("name") == "nodeTypes" for s in p.iter("string")]
            assert types == [kind.__name__]


def test_every_widget_the_code_uses_exists():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE.read_text()))
    assert used, "the module uses no widget?"
    missing = used - set(widgets())
    assert not missing, missing
    # Node combo boxes get the scene through the standard connections.
    receivers = {c.findtext("receiver") for c in tree().iter("connection") if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    combos = {n for n, w in widgets().items() if w.get("class") == "qMRMLNodeComboBox"}
    assert combos <= receivers


def test_the_extension_s_images_name_files_that_exist():
    """The Extensions Index downloads the icon and every screenshot (scripts/check_description_files.py of
    Slicer/ExtensionsIndex: at least one screenshot, each an image): each URL names a PNG of this repository."""
    text = (ROOT / "CMakeLists.txt").read_text()
    raw = "https://raw.githubusercontent.com/liverseg/SlicerLiverSeg/main/"
    urls = {field: re.search(rf'set\(EXTENSION_{field} "(.*?)"\)', text).group(1).split()
            for field in ("ICONURL", "SCREENSHOTURLS")}
    assert len(urls["ICONURL"]) == 1 and urls["SCREENSHOTURLS"], urls
    for url in urls["ICONURL"] + urls["SCREENSHOTURLS"]:
        assert url.startswith(raw), url
        path = ROOT / url[len(raw):]
        assert path.is_file(), f"{url}: no {path.relative_to(ROOT)} in the repository"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", url
