"""Reading CT volumes (NIfTI, DICOM) and writing masks with the input's exact geometry."""
