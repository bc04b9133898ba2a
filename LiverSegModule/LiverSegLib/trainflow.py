"""The panel's Fine-tune section: the guarded fine-tune of the correction loop on the export dataset, in an engine
process of its own, with progress, Cancel, the parent-versus-new table and the verdict; an accepted model joins
the model selector."""

from __future__ import annotations

from LiverSegLib.progress import outcome_shown, show_progress
from LiverSegLib.slots import reported
from LiverSegLib.texts import comparison_html


class FineTuneFlow:
    """Mixed into the panel (``LiverSegWidget``): uses its ``ui``, ``logic``, ``_parameterNode``, ``_timer``,
    ``_installFirst``, ``_fillModels``, ``_tell`` and ``_updateButtons``; holds ``_trainRun``."""

    def onTrainButton(self) -> None:
        p = self._parameterNode
        with reported("LiverSeg could not start fine-tuning.", self._tell):
            if not self._installFirst(p.device, True, self.onTrainButton):
                return
            self._trainRun = self.logic.startFineTune(self.ui.exportFolderPathLineEdit.currentPath,
                                                      p.device, p.modelPath or None,
                                                      iterations=int(self.ui.trainIterationsSpinBox.value))
            self.ui.trainProgressBar.value = 0
            self.ui.trainStatusLabel.text = "Starting..."
            self.ui.trainResultLabel.text = ""
            self._timer.start()
        self._updateButtons()

    def onTrainCancelButton(self) -> None:
        if self._trainRun is not None:
            self._trainRun.cancel()
            self._pollTraining()

    def _pollTraining(self) -> None:
        """Show the fine-tune's progress; at the end, the parent-versus-new table and the verdict."""

        run = self._trainRun
        if not show_progress(run, self.ui.trainProgressBar, self.ui.trainStatusLabel):
            return
        self._trainRun = None
        with outcome_shown(run, self.ui.trainStatusLabel, "fine-tuning ", "Fine-tuning failed; no model was added.",
                           cancelled="Cancelled; no model was added.", crashed="Fine-tuning failed."):
            result = self.logic.finishFineTune(run)
            self.ui.trainResultLabel.text = comparison_html(result, run.notes)
            if result.accepted:
                self._fillModels(select=result.model_dir)
                self.ui.trainStatusLabel.text = f"Accepted: {result.model_dir} is now selected."
            else:
                self.ui.trainStatusLabel.text = (f"Rejected: the new model is kept in {result.model_dir} for "
                                                 "inspection and not offered.")
        self._updateButtons()
