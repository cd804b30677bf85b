"""Runtime: run folders, MLflow tracking, Ray clusters and the places algorithms are run from.

Algorithms elsewhere in dpdistill are plain torch; this package is the one place Ray and MLflow enter.
"""
