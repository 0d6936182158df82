"""Downstream classification (the paper's Table 2): metrics, significance, a ResNet-34, the protocol, the report."""
