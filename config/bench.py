# Throughput of the full-size model on random tensors (no data): python train.py config/bench.py --method=sync
bench = True
batch_size = 64
bench_warmup = 5
bench_iters = 20
