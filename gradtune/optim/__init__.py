from torch.optim import SGD, AdamW  # TEMP STUB
