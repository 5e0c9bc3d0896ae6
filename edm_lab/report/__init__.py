"""edm_lab.report"""
