import torch

# one thread: on a shared 2-core machine, two spinning intra-op threads are several times slower
torch.set_num_threads(1)
