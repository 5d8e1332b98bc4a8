"""The CNI protocol: error codes, versions, CNI_* parameters and result models."""
