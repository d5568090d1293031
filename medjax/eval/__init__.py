"""Evaluation: the MedDialogRubrics dialogue benchmark (`dialogue`) and research QA (`research`)."""
