"""The multilevel clustering method: dataset, category and image levels, fusion, refinement, labeling."""
