"""Segmenting a CT: the coarse-to-fine segmenter with its checks and warnings (``segmenter``), the one-click
fixes of a mask (``fixes``), and masks as compact text for node attributes (``masktext``).
"""
