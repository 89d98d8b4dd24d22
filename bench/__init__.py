from bench.loading import load_segmenter
