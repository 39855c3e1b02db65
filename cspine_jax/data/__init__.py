"""Data: RSNA-layout I/O (DICOM, NIfTI, CSVs), synthetic phantoms, cache and input pipeline."""
