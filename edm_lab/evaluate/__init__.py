"""edm_lab.evaluate"""
