"""The panel's install flow: what a click needs and is missing is asked for once, installed in a process of its
own with progress on the panel's bar, and the click is done again when the install has ended (the panel's
timer polls it). A user who says no is told on the status line: that is no error."""

from __future__ import annotations

from LiverSegLib.progress import show_error, show_progress


class InstallFlow:
    """Mixed into the panel (``LiverSegWidget``): uses its ``ui``, ``_timer``, ``_updateButtons``,
    ``_gpuHints`` and ``_updateDevices``; holds ``_installRun`` and ``_afterInstall``."""

    def _installFirst(self, device: str, training: bool, then) -> bool:
        """True when everything is there; else asks once, starts the install in a process and calls
        ``then`` when it is done (False meanwhile). A user who says no is told so on the status line (False)."""
        from LiverSegLib.dependencies import InstallRun, ask_to_install, missing_packages

        missing = missing_packages(device, training)
        if not missing:
            return True
        if not ask_to_install(missing):
            self.ui.statusLabel.text = f"Not installed: this needs {', '.join(missing)} (asked again on the next click)."
            self._updateButtons()
            return False
        self._installRun, self._afterInstall = InstallRun(missing), then
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = f"Installing {', '.join(missing)}..."
        self._timer.start()
        self._updateButtons()
        return False

    def _pollInstall(self) -> None:
        from LiverSegExtension.errors import CancelledError, LiverSegError

        run = self._installRun
        if not show_progress(run, self.ui.progressBar, self.ui.statusLabel):
            return
        self._installRun, then = None, self._afterInstall
        self._afterInstall = None
        still = run.still_missing() if run.error is None else []
        self._updateButtons()
        self._gpuHints(refresh=True)
        self._updateDevices()
        if isinstance(run.error, CancelledError):
            self.ui.statusLabel.text = "Installation cancelled."
        elif run.error is not None or still:
            error = run.error or LiverSegError(f"installed, yet not importable: {', '.join(still)} (restart Slicer)")
            self.ui.statusLabel.text = "Installation failed."
            show_error(str(error), run.details)
        else:
            self.ui.statusLabel.text = "Installed."
            then()
