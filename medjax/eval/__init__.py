"""Evaluation: the MedDialogRubrics dialogue benchmark (`dialogue`)."""
